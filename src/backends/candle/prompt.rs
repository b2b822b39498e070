//! Chat messages → prompt text, the way the model was trained to see them.
//!
//! A GGUF may carry its own Jinja chat template (`tokenizer.chat_template`); it is rendered with
//! minijinja exactly as written. Base models ship none, so each architecture has a known turn
//! format to fall back on (Gemma: `<start_of_turn>user … <end_of_turn>`, the system prompt folded
//! into the first user turn, as Gemma's own template does).

use minijinja::{context, Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// One message with its content reduced to text.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TextMessage {
    /// `system`, `user`, `assistant` (or `developer`, `tool`...).
    pub role: String,
    /// The text content.
    pub content: String,
}

/// Why messages could not be rendered.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PromptError {
    /// Content the local model cannot take (images, audio...).
    #[error(
        "messages[{index}] has a content part of type `{kind}`, which the local model cannot read"
    )]
    Unsupported {
        /// Message index.
        index: usize,
        /// Part type.
        kind: String,
    },
    /// The template failed.
    #[error("chat template: {0}")]
    Template(String),
}

/// Reduces OpenAI messages to text messages. Text parts are joined; any other part is an error.
pub fn text_messages(messages: &[Value]) -> Result<Vec<TextMessage>, PromptError> {
    messages
        .iter()
        .enumerate()
        .map(|(index, m)| {
            let role = m
                .get("role")
                .and_then(Value::as_str)
                .unwrap_or("user")
                .to_owned();
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match part.get("type").and_then(Value::as_str) {
                            Some("text") | None => text.push_str(
                                part.get("text").and_then(Value::as_str).unwrap_or_default(),
                            ),
                            Some(kind) => {
                                return Err(PromptError::Unsupported {
                                    index,
                                    kind: kind.to_owned(),
                                })
                            }
                        }
                    }
                    text
                }
                _ => String::new(),
            };
            Ok(TextMessage { role, content })
        })
        .collect()
}

/// How prompts are rendered for one model.
#[derive(Debug, Clone)]
pub enum PromptFormat {
    /// The GGUF's own Jinja template, with the BOS token text it expects.
    Template {
        /// Template source.
        source: String,
        /// `bos_token` as the template sees it.
        bos_token: String,
        /// `eos_token` as the template sees it.
        eos_token: String,
    },
    /// Gemma's turn format.
    Gemma,
    /// No turn markup: the messages' texts one after another (system first), for base models,
    /// which continue text rather than answer turns; `bos` is the BOS token text.
    Plain {
        /// `<bos>` or the model's equivalent.
        bos: String,
    },
}

impl PromptFormat {
    /// Renders messages, ending with the cue for the model's turn. The result includes the BOS
    /// token text where the format has it, and is tokenized with special tokens recognised.
    pub fn render(&self, messages: &[TextMessage]) -> Result<String, PromptError> {
        match self {
            PromptFormat::Gemma => Ok(render_gemma(messages)),
            PromptFormat::Plain { bos } => Ok(render_plain(messages, bos)),
            PromptFormat::Template {
                source,
                bos_token,
                eos_token,
            } => render_template(source, messages, bos_token, eos_token),
        }
    }
}

fn render_plain(messages: &[TextMessage], bos: &str) -> String {
    let system = messages
        .iter()
        .filter(|m| matches!(m.role.as_str(), "system" | "developer"));
    let rest = messages
        .iter()
        .filter(|m| !matches!(m.role.as_str(), "system" | "developer"));
    let texts: Vec<&str> = system.chain(rest).map(|m| m.content.trim()).collect();
    format!("{bos}{}", texts.join("\n\n"))
}

fn render_gemma(messages: &[TextMessage]) -> String {
    let mut out = String::from("<bos>");
    let mut system = String::new();
    let mut first_user = true;
    for m in messages {
        match m.role.as_str() {
            "system" | "developer" => {
                system.push_str(&m.content);
                system.push_str("\n\n");
            }
            role => {
                let turn = if role == "assistant" { "model" } else { "user" };
                out.push_str("<start_of_turn>");
                out.push_str(turn);
                out.push('\n');
                if turn == "user" && first_user {
                    out.push_str(&system);
                    first_user = false;
                }
                out.push_str(m.content.trim());
                out.push_str("<end_of_turn>\n");
            }
        }
    }
    if first_user && !system.is_empty() {
        // Only a system prompt: it becomes the user turn.
        out.push_str("<start_of_turn>user\n");
        out.push_str(system.trim_end());
        out.push_str("<end_of_turn>\n");
    }
    out.push_str("<start_of_turn>model\n");
    out
}

fn render_template(
    source: &str,
    messages: &[TextMessage],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, PromptError> {
    let mut env = Environment::new();
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, JinjaError> {
            Err(JinjaError::new(ErrorKind::InvalidOperation, message))
        },
    );
    env.add_template("chat", source)
        .map_err(|e| PromptError::Template(e.to_string()))?;
    let template = env
        .get_template("chat")
        .map_err(|e| PromptError::Template(e.to_string()))?;
    template
        .render(context! {
            messages => messages,
            bos_token => bos_token,
            eos_token => eos_token,
            add_generation_prompt => true,
        })
        .map_err(|e| PromptError::Template(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msgs(v: Value) -> Vec<TextMessage> {
        text_messages(v.as_array().unwrap()).unwrap()
    }

    #[test]
    fn gemma_turns_fold_the_system_prompt_into_the_first_user_turn() {
        let m = msgs(json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]}
        ]));
        assert_eq!(
            PromptFormat::Gemma.render(&m).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn images_are_refused() {
        let e = text_messages(json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]).as_array().unwrap()).unwrap_err();
        assert_eq!(
            e,
            PromptError::Unsupported {
                index: 0,
                kind: "image_url".into()
            }
        );
    }

    #[test]
    fn a_gguf_template_renders_with_minijinja() {
        // The shape of Gemma's published template, reduced.
        let source = "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<start_of_turn>user\n{{ m.content | trim }}<end_of_turn>\n{% elif m.role == 'assistant' %}<start_of_turn>model\n{{ m.content | trim }}<end_of_turn>\n{% else %}{{ raise_exception('bad role ' ~ m.role) }}{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}";
        let format = PromptFormat::Template {
            source: source.into(),
            bos_token: "<bos>".into(),
            eos_token: "<eos>".into(),
        };
        let m = msgs(
            json!([{"role": "user", "content": " Hi "}, {"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"}]),
        );
        assert_eq!(
            format.render(&m).unwrap(),
            "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        let e = format
            .render(&msgs(json!([{"role": "tool", "content": "x"}])))
            .unwrap_err();
        assert!(e.to_string().contains("bad role tool"), "{e}");
    }
}
