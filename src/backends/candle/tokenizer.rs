//! A tokenizer built from the GGUF file's own metadata, so a model file is all an operator needs.
//!
//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`, as in Gemma) ship pieces with
//! scores and no merges. SentencePiece's BPE merges pieces in order of the merged piece's score,
//! so the merge list can be derived: every split of a piece into two pieces that both exist
//! becomes a merge ranked by the piece's score (then by the split's lengths, longest left first),
//! which is exactly how Hugging Face converts these models. Two details of llama.cpp's GGUF
//! conversion are undone first: user-defined pieces are stored with real spaces instead of `▁`,
//! and control and user-defined pieces carry a placeholder score of -1000 where SentencePiece has
//! 0. The result matches the reference tokenizer.json token for token (tests/tokenizer.rs).

use candle_core::quantized::gguf_file::Content;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, DecoderWrapper, SplitDelimiterBehavior, Tokenizer};

use super::gguf::{GgufError, Metadata};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TYPE_CONTROL: i32 = 3;
const TYPE_USER_DEFINED: i32 = 4;

/// SentencePiece's word-boundary marker.
const SPACE_MARK: &str = "\u{2581}";

/// Why a tokenizer could not be built or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// Metadata missing or malformed.
    #[error(transparent)]
    Metadata(#[from] GgufError),
    /// A vocabulary kind this build does not handle.
    #[error("tokenizer.ggml.model = \"{0}\" is not supported (supported: \"llama\", SentencePiece vocabularies such as Gemma's and Llama 2's; \"gpt2\", byte-level BPE such as Llama 3's and Qwen's)")]
    Unsupported(String),
    /// The tokenizers library refused the construction or the input.
    #[error("tokenizer: {0}")]
    Library(String),
}

fn lib(e: impl std::fmt::Display) -> TokenizerError {
    TokenizerError::Library(e.to_string())
}

/// A model's tokenizer plus the special ids generation needs.
pub struct GgufTokenizer {
    inner: Tokenizer,
    /// Beginning-of-sequence id.
    pub bos: u32,
    /// End-of-sequence id.
    pub eos: u32,
    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`).
    pub add_bos: bool,
    vocab_size: usize,
}

impl GgufTokenizer {
    /// Builds the tokenizer described by a GGUF header.
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        let meta = Metadata(&content.metadata);
        match meta.string("tokenizer.ggml.model")? {
            "llama" => sentencepiece_bpe(&meta),
            "gpt2" => byte_level_bpe(content, &meta),
            other => Err(TokenizerError::Unsupported(other.to_owned())),
        }
    }

    /// Token ids of `text`. Special-token text such as `<start_of_turn>` maps to its id; BOS is
    /// not added (callers add it where the prompt format wants it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        Ok(self
            .inner
            .encode(text, false)
            .map_err(lib)?
            .get_ids()
            .to_vec())
    }

    /// Text of `ids`, dropping control tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, true).map_err(lib)
    }

    /// The string of a token id, if it is in the vocabulary.
    pub fn token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// Byte-level BPE with explicit merges (`tokenizer.ggml.model = "gpt2"`): candle's builder
/// reads the vocabulary, merges and the pre-tokenizer named by `tokenizer.ggml.pre`.
fn byte_level_bpe(content: &Content, meta: &Metadata<'_>) -> Result<GgufTokenizer, TokenizerError> {
    use candle_core::quantized::tokenizer::TokenizerFromGguf;
    let inner = Tokenizer::from_gguf(content).map_err(lib)?;
    let vocab_size = meta.strings("tokenizer.ggml.tokens")?.len();
    let eos = meta.u32("tokenizer.ggml.eos_token_id")?;
    Ok(GgufTokenizer {
        inner,
        // Qwen's vocabularies name no BOS and do not add one.
        bos: meta.u32("tokenizer.ggml.bos_token_id").unwrap_or(eos),
        eos,
        add_bos: meta.bool_or("tokenizer.ggml.add_bos_token", false)?,
        vocab_size,
    })
}

fn sentencepiece_bpe(meta: &Metadata<'_>) -> Result<GgufTokenizer, TokenizerError> {
    let raw_pieces = meta.strings("tokenizer.ggml.tokens")?;
    let scores: Vec<f32> = meta
        .array("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.to_f32().unwrap_or(0.0))
        .collect();
    let types: Vec<i32> = if meta.has("tokenizer.ggml.token_type") {
        meta.array("tokenizer.ggml.token_type")?
            .iter()
            .map(|v| v.to_i32().unwrap_or(1))
            .collect()
    } else {
        vec![1; raw_pieces.len()]
    };
    if scores.len() != raw_pieces.len() || types.len() != raw_pieces.len() {
        return Err(GgufError::Invalid {
            key: "tokenizer.ggml.scores".to_owned(),
            detail: format!(
                "{} tokens but {} scores and {} types",
                raw_pieces.len(),
                scores.len(),
                types.len()
            ),
        }
        .into());
    }

    let pieces: Vec<String> = raw_pieces
        .iter()
        .zip(&types)
        .map(|(p, t)| {
            if *t == TYPE_USER_DEFINED {
                p.replace(' ', SPACE_MARK)
            } else {
                (*p).to_owned()
            }
        })
        .collect();
    let scores: Vec<f32> = scores
        .iter()
        .zip(&types)
        .map(|(s, t)| {
            if matches!(*t, TYPE_CONTROL | TYPE_USER_DEFINED) {
                0.0
            } else {
                *s
            }
        })
        .collect();

    let mut vocab = Vocab::default();
    vocab.reserve(pieces.len());
    for (id, piece) in pieces.iter().enumerate() {
        vocab.entry(piece.clone()).or_insert(id as u32);
    }
    let merges = derive_merges(&pieces, &scores, &vocab);

    let unk_id = meta.u32("tokenizer.ggml.unknown_token_id").unwrap_or(0) as usize;
    let unk = pieces
        .get(unk_id)
        .cloned()
        .unwrap_or_else(|| "<unk>".to_owned());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(true)
        .build()
        .map_err(lib)?;

    let mut inner = Tokenizer::new(bpe);
    inner
        .with_normalizer(Some(Replace::new(" ", SPACE_MARK).map_err(lib)?))
        .map_err(lib)?;
    inner.with_pre_tokenizer(Some(
        Split::new(
            SplitPattern::String(" ".to_owned()),
            SplitDelimiterBehavior::MergedWithPrevious,
            false,
        )
        .map_err(lib)?,
    ));
    inner.with_decoder(Some(DecoderWrapper::Sequence(Sequence::new(vec![
        DecoderWrapper::Replace(Replace::new(SPACE_MARK, " ").map_err(lib)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ]))));

    // Control and user-defined pieces are matched whole in the input, before BPE. GGUF cannot
    // tell which control pieces Hugging Face flags "special"; all are, which only affects
    // decoding (control pieces are dropped from decoded text).
    let added: Vec<AddedToken> = pieces
        .iter()
        .zip(&types)
        .filter(|(_, t)| matches!(**t, TYPE_CONTROL | TYPE_USER_DEFINED))
        .map(|(p, t)| AddedToken::from(p.clone(), *t == TYPE_CONTROL).normalized(false))
        .collect();
    inner.add_tokens(added).map_err(lib)?;

    Ok(GgufTokenizer {
        inner,
        bos: meta.u32("tokenizer.ggml.bos_token_id")?,
        eos: meta.u32("tokenizer.ggml.eos_token_id")?,
        add_bos: meta.bool_or("tokenizer.ggml.add_bos_token", true)?,
        vocab_size: pieces.len(),
    })
}

/// SentencePiece BPE merges from pieces and scores: each split of a piece into two known pieces,
/// ranked by the piece's score, then longer left part, then longer right part; ties keep piece
/// order, and splits of one piece are ordered by the ids of their parts.
fn derive_merges(pieces: &[String], scores: &[f32], vocab: &Vocab) -> Vec<(String, String)> {
    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut all: Vec<Candidate<'_>> = Vec::new();
    let mut local: Vec<(u32, u32, Candidate<'_>)> = Vec::new();
    for (piece, &score) in pieces.iter().zip(scores) {
        local.clear();
        let chars = piece.chars().count();
        for (n, (at, _)) in piece.char_indices().enumerate().skip(1) {
            let (left, right) = piece.split_at(at);
            if let (Some(&l), Some(&r)) = (vocab.get(left), vocab.get(right)) {
                local.push((
                    l,
                    r,
                    Candidate {
                        left,
                        right,
                        score,
                        left_chars: n,
                        right_chars: chars - n,
                    },
                ));
            }
        }
        local.sort_by_key(|(l, r, _)| (*l, *r));
        all.extend(local.drain(..).map(|(_, _, c)| c));
    }
    // Stable sort, descending on (score, left length, right length).
    all.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    all.into_iter()
        .map(|c| (c.left.to_owned(), c.right.to_owned()))
        .collect()
}
