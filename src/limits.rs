//! Per-client rate limits: requests and tokens per minute, each a GCRA (generic cell rate
//! algorithm) bucket keyed by client.
//!
//! GCRA keeps one instant per bucket, the "theoretical arrival time": admitting a request of
//! cost `c` moves it `c` emission intervals (a minute divided by the limit) into the future, and
//! a request is refused when that would put it more than a minute ahead of now. So a client may
//! spend a whole minute's allowance at once, then at the steady rate, and a refusal knows exactly
//! how long until it would pass (the `Retry-After`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::{AuthConfig, LimitsConfig};
use crate::error::ApiError;

/// Buckets kept before idle ones (fully recovered, so equivalent to a fresh one) are dropped.
const PRUNE_ABOVE: usize = 10_000;

/// The window a full allowance may be spent in.
const MINUTE: Duration = Duration::from_secs(60);

/// Who a request is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Client {
    /// An authenticated client: its key's configured name.
    Key(String),
    /// No client keys configured: the peer address.
    Address(std::net::IpAddr),
}

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Client::Key(name) => write!(f, "key:{name}"),
            Client::Address(ip) => write!(f, "ip:{ip}"),
        }
    }
}

/// Requests- and tokens-per-minute limits for every client.
#[derive(Debug)]
pub struct RateLimits {
    requests_per_minute: u32,
    tokens_per_minute: u64,
    per_key: HashMap<String, (Option<u32>, Option<u64>)>,
    buckets: Mutex<HashMap<Client, Buckets>>,
}

#[derive(Debug, Clone, Copy)]
struct Buckets {
    requests: Instant,
    tokens: Instant,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// Requests per minute.
    Requests,
    /// Tokens per minute.
    Tokens,
}

impl Limit {
    /// The `wattgate_rejected_requests_total` reason.
    pub fn reason(self) -> &'static str {
        match self {
            Limit::Requests => "rate_limited_requests",
            Limit::Tokens => "rate_limited_tokens",
        }
    }
}

/// A refusal: which limit, its size, and how long until the request would pass (`None`: never,
/// the request alone is larger than a minute's allowance).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The limit that refused.
    pub limit: Limit,
    /// Its per-minute size.
    pub per_minute: u64,
    /// What the request asked for.
    pub cost: u64,
    /// When it would fit.
    pub retry_after: Option<Duration>,
}

impl Refusal {
    /// The client's 429.
    pub fn to_api_error(&self, client: &Client) -> ApiError {
        let what = match self.limit {
            Limit::Requests => "requests per minute",
            Limit::Tokens => "tokens per minute",
        };
        match self.retry_after {
            Some(wait) => {
                let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
                let mut e = ApiError::rate_limited(format!(
                    "Rate limit reached for {client} on {what}: limit {}, requested {}. Please try again in {seconds}s.",
                    self.per_minute, self.cost
                ));
                e.retry_after = Some(seconds.to_string());
                e
            }
            None => ApiError::rate_limited(format!(
                "Request too large for {client} on {what}: limit {}, requested {}. Lower max_tokens or shorten the messages.",
                self.per_minute, self.cost
            )),
        }
    }
}

impl RateLimits {
    /// The limits `[limits]` and `[auth.keys]` configure.
    pub fn new(limits: &LimitsConfig, auth: &AuthConfig) -> Self {
        Self {
            requests_per_minute: limits.requests_per_minute,
            tokens_per_minute: limits.tokens_per_minute,
            per_key: auth
                .keys
                .iter()
                .map(|k| (k.name.clone(), (k.requests_per_minute, k.tokens_per_minute)))
                .collect(),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The limits that apply to `client` (0: none).
    fn limits_of(&self, client: &Client) -> (u64, u64) {
        let own = match client {
            Client::Key(name) => self.per_key.get(name).copied(),
            Client::Address(_) => None,
        };
        let (rpm, tpm) = own.unwrap_or((None, None));
        (
            u64::from(rpm.unwrap_or(self.requests_per_minute)),
            tpm.unwrap_or(self.tokens_per_minute),
        )
    }

    /// Charges one request of `tokens` tokens to `client`, or refuses it without charging.
    pub fn charge(&self, client: &Client, tokens: u64) -> Result<(), Refusal> {
        self.charge_at(client, tokens, Instant::now())
    }

    fn charge_at(&self, client: &Client, tokens: u64, now: Instant) -> Result<(), Refusal> {
        let (rpm, tpm) = self.limits_of(client);
        if rpm == 0 && tpm == 0 {
            return Ok(());
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > PRUNE_ABOVE {
            buckets.retain(|_, b| b.requests > now || b.tokens > now);
        }
        let b = buckets.entry(client.clone()).or_insert(Buckets {
            requests: now,
            tokens: now,
        });
        let requests = gcra(b.requests, now, 1, rpm, Limit::Requests)?;
        let tokens = gcra(b.tokens, now, tokens, tpm, Limit::Tokens)?;
        b.requests = requests;
        b.tokens = tokens;
        Ok(())
    }
}

/// The bucket's next theoretical arrival time after admitting `cost`, or the refusal.
fn gcra(
    tat: Instant,
    now: Instant,
    cost: u64,
    per_minute: u64,
    limit: Limit,
) -> Result<Instant, Refusal> {
    if per_minute == 0 {
        return Ok(tat);
    }
    let refusal = |retry_after| Refusal {
        limit,
        per_minute,
        cost,
        retry_after,
    };
    if cost > per_minute {
        return Err(refusal(None));
    }
    let interval = MINUTE.as_secs_f64() / per_minute as f64;
    let next = tat.max(now) + Duration::from_secs_f64(interval * cost as f64);
    let ahead = next - now;
    if ahead > MINUTE {
        return Err(refusal(Some(ahead - MINUTE)));
    }
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClientKeyConfig;

    fn limits(rpm: u32, tpm: u64) -> RateLimits {
        let config = LimitsConfig {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
            ..LimitsConfig::default()
        };
        let auth = AuthConfig {
            keys: vec![ClientKeyConfig {
                name: "big".into(),
                sha256: "0".repeat(64),
                requests_per_minute: Some(600),
                tokens_per_minute: None,
            }],
            admin_key_sha256: None,
        };
        RateLimits::new(&config, &auth)
    }

    #[test]
    fn a_minute_of_requests_passes_at_once_then_the_steady_rate() {
        let l = limits(60, 0);
        let c = Client::Key("a".into());
        let t0 = Instant::now();
        for i in 0..60 {
            assert_eq!(l.charge_at(&c, 0, t0), Ok(()), "request {i}");
        }
        let refused = l
            .charge_at(&c, 0, t0)
            .expect_err("61st in the same instant");
        assert_eq!(refused.limit, Limit::Requests);
        // One request per second refills: the wait is one interval.
        assert_eq!(refused.retry_after, Some(Duration::from_secs(1)));
        // A refusal charges nothing: after exactly that wait one more passes, then none.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(l.charge_at(&c, 0, t1), Ok(()));
        assert!(l.charge_at(&c, 0, t1).is_err());
        // After a quiet minute the whole allowance is back.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..60 {
            assert_eq!(l.charge_at(&c, 0, t2), Ok(()));
        }
    }

    #[test]
    fn tokens_are_charged_by_size_and_clients_are_separate() {
        let l = limits(0, 1000);
        let (a, b) = (Client::Key("a".into()), Client::Key("b".into()));
        let t0 = Instant::now();
        assert_eq!(l.charge_at(&a, 600, t0), Ok(()));
        let refused = l.charge_at(&a, 600, t0).expect_err("1200 > 1000");
        assert_eq!(refused.limit, Limit::Tokens);
        // 200 tokens over: 200 tokens at 1000/min take 12 s to refill.
        assert_eq!(refused.retry_after, Some(Duration::from_secs(12)));
        assert_eq!(l.charge_at(&b, 600, t0), Ok(()), "b has its own bucket");
        // A request larger than the whole allowance can never pass.
        let never = l.charge_at(&b, 1001, t0).expect_err("too large");
        assert_eq!(never.retry_after, None);
        assert!(never
            .to_api_error(&b)
            .message
            .contains("limit 1000, requested 1001"));
    }

    #[test]
    fn a_token_refusal_does_not_spend_the_request_allowance() {
        let l = limits(2, 100);
        let c = Client::Address([127, 0, 0, 1].into());
        let t0 = Instant::now();
        assert!(l.charge_at(&c, 500, t0).is_err());
        assert!(l.charge_at(&c, 500, t0).is_err());
        assert_eq!(l.charge_at(&c, 10, t0), Ok(()));
        assert_eq!(l.charge_at(&c, 10, t0), Ok(()));
        assert_eq!(
            l.charge_at(&c, 10, t0).map_err(|r| r.limit),
            Err(Limit::Requests)
        );
    }

    #[test]
    fn a_key_can_have_its_own_limit() {
        let l = limits(1, 0);
        let t0 = Instant::now();
        let big = Client::Key("big".into());
        for _ in 0..600 {
            assert_eq!(l.charge_at(&big, 0, t0), Ok(()));
        }
        assert!(l.charge_at(&big, 0, t0).is_err());
        let small = Client::Key("small".into());
        assert_eq!(l.charge_at(&small, 0, t0), Ok(()));
        assert!(l.charge_at(&small, 0, t0).is_err());
    }

    #[test]
    fn no_limits_never_refuse_and_keep_no_state() {
        let l = limits(0, 0);
        let c = Client::Key("a".into());
        for _ in 0..1000 {
            assert_eq!(l.charge(&c, u64::MAX), Ok(()));
        }
        assert!(l.buckets.lock().map(|b| b.is_empty()).unwrap_or(false));
    }
}
