//! Embedded inference: GGUF models run in-process with candle, no other server needed.
//!
//! Built up in steps (issue 3): the tokenizer comes first, read from the GGUF's own metadata so
//! that no extra download is needed; the forward pass and the backend follow.

pub mod backend;
pub mod decoder;
mod engine;
pub mod gemma3;
pub mod gguf;
pub mod linear;
mod prefix;
pub mod prompt;
pub mod sampling;
mod scheduler;
pub mod tokenizer;
