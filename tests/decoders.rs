//! The Llama / Qwen2 / Qwen3 decoder and the byte-level BPE ("gpt2") tokenizer, on tiny
//! random-weight GGUF files written by the test itself (no such model can be fetched here): the
//! files load, serve through the real gateway locally with real usage, and generate
//! deterministically, streaming and not. Agreement with llama.cpp on the same files is checked
//! by scripts/check_decoders.sh (outside CI, it needs llama.cpp).

mod support;

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use serde_json::{json, Value as Json};
use support::{header, Gateway};

const HIDDEN: usize = 128;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const FFN: usize = 256;
const HEAD_DIM: usize = HIDDEN / HEADS;

/// GPT-2's printable stand-ins for the 256 byte values.
fn byte_chars() -> Vec<String> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut shifted = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b)
            } else {
                shifted += 1;
                char::from_u32(255 + shifted)
            }
            .map(String::from)
            .unwrap_or_default()
        })
        .collect()
}

struct Random(u64);

impl Random {
    fn normal_ish(&mut self) -> f32 {
        // Sum of uniforms: mean 0, unit-ish spread; plenty for random weights.
        (0..4)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5
            })
            .sum::<f32>()
            * 1.7
    }
}

/// Writes a tiny model of `arch` with a byte-level BPE vocabulary and a ChatML template.
fn tiny_model(arch: &str, dir: &Path) -> PathBuf {
    let mut tokens = byte_chars();
    let merges = [
        "Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "a t",
    ];
    tokens.extend(merges.iter().map(|m| m.replace(' ', "")));
    let mut types = vec![1i32; tokens.len()];
    for special in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(special.to_owned());
        types.push(3);
    }
    while !tokens.len().is_multiple_of(32) {
        tokens.push(format!("<|pad{}|>", tokens.len()));
        types.push(5);
    }
    let eos = tokens.iter().position(|t| t == "<|im_end|>").unwrap_or(0) as u32;
    let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
    let template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
    let key = |k: &str| format!("{arch}.{k}");
    let metadata: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        (key("block_count"), Value::U32(LAYERS as u32)),
        (key("context_length"), Value::U32(512)),
        (key("embedding_length"), Value::U32(HIDDEN as u32)),
        (key("feed_forward_length"), Value::U32(FFN as u32)),
        (key("attention.head_count"), Value::U32(HEADS as u32)),
        (key("attention.head_count_kv"), Value::U32(KV_HEADS as u32)),
        (key("attention.layer_norm_rms_epsilon"), Value::F32(1e-6)),
        (key("rope.freq_base"), Value::F32(10_000.0)),
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("qwen2".into())),
        ("tokenizer.ggml.tokens".into(), strings(&tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            strings(&merges.iter().map(|m| m.to_string()).collect::<Vec<_>>()),
        ),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(eos)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
        (
            "tokenizer.chat_template".into(),
            Value::String(template.into()),
        ),
    ];
    let mut rng = Random(0x5eed ^ arch.len() as u64);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut matrix = |name: String, rows: usize, cols: usize, scale: f32, rng: &mut Random| {
        let data: Vec<f32> = (0..rows * cols).map(|_| rng.normal_ish() * scale).collect();
        let t = Tensor::from_vec(data, (rows, cols), &Device::Cpu).expect("tensor");
        tensors.push((
            name,
            QTensor::quantize(&t, GgmlDType::Q8_0).expect("quantize"),
        ));
    };
    let vocab = tokens.len();
    matrix("token_embd.weight".into(), vocab, HIDDEN, 0.5, &mut rng);
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}");
        matrix(p("attn_q.weight"), HEADS * HEAD_DIM, HIDDEN, 0.08, &mut rng);
        matrix(
            p("attn_k.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            0.08,
            &mut rng,
        );
        matrix(
            p("attn_v.weight"),
            KV_HEADS * HEAD_DIM,
            HIDDEN,
            0.08,
            &mut rng,
        );
        matrix(
            p("attn_output.weight"),
            HIDDEN,
            HEADS * HEAD_DIM,
            0.08,
            &mut rng,
        );
        matrix(p("ffn_gate.weight"), FFN, HIDDEN, 0.08, &mut rng);
        matrix(p("ffn_up.weight"), FFN, HIDDEN, 0.08, &mut rng);
        matrix(p("ffn_down.weight"), HIDDEN, FFN, 0.08, &mut rng);
    }
    if arch != "qwen3" {
        matrix("output.weight".into(), vocab, HIDDEN, 0.5, &mut rng);
    }
    let mut vector = |name: String, n: usize, around: f32, rng: &mut Random| {
        let data: Vec<f32> = (0..n).map(|_| around + rng.normal_ish() * 0.1).collect();
        let t = Tensor::from_vec(data, n, &Device::Cpu).expect("tensor");
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32).expect("f32")));
    };
    vector("output_norm.weight".into(), HIDDEN, 1.0, &mut rng);
    for i in 0..LAYERS {
        let p = |n: &str| format!("blk.{i}.{n}");
        vector(p("attn_norm.weight"), HIDDEN, 1.0, &mut rng);
        vector(p("ffn_norm.weight"), HIDDEN, 1.0, &mut rng);
        if arch == "qwen2" {
            vector(p("attn_q.bias"), HEADS * HEAD_DIM, 0.0, &mut rng);
            vector(p("attn_k.bias"), KV_HEADS * HEAD_DIM, 0.0, &mut rng);
            vector(p("attn_v.bias"), KV_HEADS * HEAD_DIM, 0.0, &mut rng);
        }
        if arch == "qwen3" {
            vector(p("attn_q_norm.weight"), HEAD_DIM, 1.0, &mut rng);
            vector(p("attn_k_norm.weight"), HEAD_DIM, 1.0, &mut rng);
        }
    }
    let path = dir.join(format!("tiny-{arch}.gguf"));
    let mut file = std::fs::File::create(&path).expect("create");
    let meta: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut file, &meta, &ts).expect("write gguf");
    path
}

fn config(path: &Path) -> String {
    format!(
        "[[backends]]\nname = \"tiny\"\nkind = \"embedded\"\nrole = \"local\"\nmodel = \"tiny\"\ngguf = \"{}\"\nparameters = 1e6\nmax_tokens = 16\nmax_context = 512\n",
        path.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_qwen2_and_qwen3_files_serve_locally_and_deterministically() {
    let dir = tempfile::tempdir().expect("tempdir");
    for arch in ["llama", "qwen2", "qwen3"] {
        let gw = Gateway::start(&config(&tiny_model(arch, dir.path()))).await;
        let body = json!({"model": "auto", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "the cat sat on the mat"}], "temperature": 0, "max_tokens": 12});
        let mut answers = Vec::new();
        for _ in 0..2 {
            let r = gw.post_chat(&body).await;
            assert_eq!(r.status(), 200, "{arch}");
            assert_eq!(header(&r, "x-wattgate-route"), "local", "{arch}");
            let v: Json = r.json().await.expect("json");
            // ChatML of two turns plus the generation prompt: well over 20 byte-level tokens.
            assert!(
                v["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 20,
                "{arch}: {v}"
            );
            let completion = v["usage"]["completion_tokens"].as_u64().unwrap_or(0);
            assert!((1..=12).contains(&completion), "{arch}: {v}");
            answers.push(v["choices"][0]["message"]["content"].clone());
        }
        assert_eq!(answers[0], answers[1], "{arch}: greedy is deterministic");
        let mut stream = body.clone();
        stream["stream"] = json!(true);
        let r = gw.post_chat(&stream).await;
        assert_eq!(header(&r, "x-wattgate-route"), "local");
        let text = r.text().await.expect("stream");
        assert!(text.ends_with("data: [DONE]\n\n"), "{arch}: {text}");
    }
}

#[test]
fn an_unsupported_architecture_is_named_in_the_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny_model("llama", dir.path());
    // Rewrite the architecture key: same file otherwise.
    let bytes = std::fs::read(&path).expect("read");
    let needle = b"llama";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("architecture string");
    let mut patched = bytes.clone();
    patched[at..at + 5].copy_from_slice(b"phi99");
    std::fs::write(&path, patched).expect("write");
    let mut file = std::fs::File::open(&path).expect("open");
    let content = gguf_file::Content::read(&mut file).expect("header");
    let err =
        wattgate::backends::candle::backend::Model::load(&content, &mut file, 512, &Device::Cpu)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
    assert!(err.contains("\"phi99\" is not supported"), "{err}");
}
