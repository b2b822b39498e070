//! Why a request went where it went: the `x-wattgate-reason` header, the ledger's `reason`
//! column and a metrics label, so its names are fixed.

/// Why a request went where it went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The client named a backend as `model`.
    Pinned,
    /// `prefer_local` and the prompt fits the local limit.
    PreferLocal,
    /// `policy = "cloud_only"`.
    CloudOnly,
    /// `policy = "local_only"`.
    LocalOnly,
    /// The prompt is longer than `routing.max_local_prompt_chars`.
    PromptTooLong,
    /// No local backend is configured.
    NoLocalBackend,
    /// The cloud was wanted but none is configured, so the local backend serves.
    NoCloudBackend,
    /// The local backend answered with an error; the cloud served.
    FallbackLocalError,
    /// The local backend timed out before its first byte; the cloud served.
    FallbackLocalTimeout,
    /// The local backend refused or dropped the connection; the cloud served.
    FallbackLocalUnreachable,
    /// The local backend is not usable as configured; the cloud served.
    FallbackLocalNotConfigured,
    /// The local model's queue was full (or its deadline passed); the cloud served.
    LocalBusy,
    /// The prompt does not fit the local model's context; the cloud served.
    ContextTooLong,
    /// The request needs something the local model cannot do; the cloud served.
    LocalUnsupported,
    /// The client forced the route with `x-wattgate-route: local`.
    ForcedLocal,
    /// The client forced the route with `x-wattgate-route: cloud`.
    ForcedCloud,
    /// The learned router's p_local cleared the threshold.
    RouterLocal,
    /// The learned router's p_local was below the threshold of every local backend.
    RouterCloud,
    /// `tools` or `functions` and no local backend supports them.
    NeedsTools,
    /// A `/v1/responses` or `/v1/messages` request that only a backend speaking that API
    /// natively can serve (tools, reasoning, tool-call items): never local.
    NeedsNativeApi,
    /// `response_format` and no local backend honours it.
    NeedsResponseFormat,
    /// Image or audio content and no local backend accepts it.
    NeedsImages,
    /// `n > 1`: local backends return one choice.
    NeedsN,
    /// `logprobs`: the local backend does not return them (`supports_logprobs`).
    NeedsLogprobs,
    /// The chosen local backend's circuit breaker is open; the cloud served.
    LocalUnhealthy,
    /// The cloud backend's circuit breaker is open; a healthy local backend served whatever the
    /// router had decided.
    CloudUnhealthy,
    /// The quality guard found the local answer doubtful; the cloud's answer replaced it.
    EscalatedLowConfidence,
    /// The quality guard found the local answer doubtful, but the cloud failed too: the held
    /// local answer was served.
    EscalationFailed,
}

impl Reason {
    /// The stable code used in headers and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Pinned => "pinned",
            Reason::PreferLocal => "prefer_local",
            Reason::CloudOnly => "cloud_only",
            Reason::LocalOnly => "local_only",
            Reason::PromptTooLong => "prompt_too_long",
            Reason::NoLocalBackend => "no_local_backend",
            Reason::NoCloudBackend => "no_cloud_backend",
            Reason::FallbackLocalError => "fallback_local_error",
            Reason::FallbackLocalTimeout => "fallback_local_timeout",
            Reason::FallbackLocalUnreachable => "fallback_local_unreachable",
            Reason::FallbackLocalNotConfigured => "fallback_local_not_configured",
            Reason::LocalBusy => "local_busy",
            Reason::ContextTooLong => "context_too_long",
            Reason::LocalUnsupported => "local_unsupported",
            Reason::ForcedLocal => "forced_local",
            Reason::ForcedCloud => "forced_cloud",
            Reason::RouterLocal => "router_local",
            Reason::RouterCloud => "router_cloud",
            Reason::NeedsTools => "needs_tools",
            Reason::NeedsNativeApi => "needs_native_api",
            Reason::NeedsResponseFormat => "needs_response_format",
            Reason::NeedsImages => "needs_images",
            Reason::NeedsN => "needs_n",
            Reason::NeedsLogprobs => "needs_logprobs",
            Reason::LocalUnhealthy => "local_unhealthy",
            Reason::CloudUnhealthy => "cloud_unhealthy",
            Reason::EscalatedLowConfidence => "escalated_low_confidence",
            Reason::EscalationFailed => "escalation_failed",
        }
    }
}
