//! Chat templates: the Jinja template a model ships (`tokenizer.chat_template`, or
//! `chat_template` in `tokenizer_config.json`) rendered with minijinja the way Hugging Face
//! `transformers` renders it: `trim_blocks` and `lstrip_blocks` on, variables `messages`,
//! `add_generation_prompt`, `bos_token`, `eos_token`, the function `raise_exception`, and the
//! Python string / dict methods templates commonly call (`.strip()`, `.startswith()`,
//! `.items()`, ...).

use minijinja::value::{Value, ValueKind};
use minijinja::{Environment, ErrorKind, State};
use serde::Serialize;

/// Errors of chat template parsing and rendering.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("the chat template does not parse: {0}; check the model's tokenizer.chat_template")]
    Parse(String),
    #[error("the chat template failed to render: {0}")]
    Render(String),
    #[error("the chat template refused the conversation: {0}")]
    Raised(String),
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

const RAISED_PREFIX: &str = "raise_exception: ";

impl ChatTemplate {
    /// Compiles `template`; `bos_token` / `eos_token` are the texts templates may insert.
    pub fn new(template: &str, bos_token: &str, eos_token: &str) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED_PREFIX}{msg}"),
                ))
            },
        );
        env.set_unknown_method_callback(python_method);
        env.add_test("divisibleby", is_divisible_by);
        env.add_template_owned("chat", template.to_string())
            .map_err(|e| ChatError::Parse(describe(&e)))?;
        Ok(ChatTemplate {
            env,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// Renders the conversation; with `add_generation_prompt` the text ends with the opening
    /// of an assistant turn.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Render(describe(&e)))?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(|e| {
            let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = cur {
                if let Some(me) = err.downcast_ref::<minijinja::Error>() {
                    if let Some(msg) = me.detail().and_then(|d| d.strip_prefix(RAISED_PREFIX)) {
                        return ChatError::Raised(msg.to_string());
                    }
                }
                cur = err.source();
            }
            ChatError::Render(describe(&e))
        })
    }
}

/// The `divisibleby` test. minijinja's own computes `a % b` unchecked, so `x is divisibleby 0`
/// in a model's template panicked the process (found by fuzzing); a zero divisor (or
/// `i128::MIN` by -1) answers false here.
fn is_divisible_by(v: &Value, by: &Value) -> bool {
    if v.is_integer() && by.is_integer() {
        match (i128::try_from(v.clone()), i128::try_from(by.clone())) {
            (Ok(a), Ok(b)) => a.checked_rem(b) == Some(0),
            _ => false,
        }
    } else {
        match (f64::try_from(v.clone()), f64::try_from(by.clone())) {
            (Ok(a), Ok(b)) => b != 0.0 && a % b == 0.0,
            _ => false,
        }
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        s.push_str(": ");
        s.push_str(&err.to_string());
        cur = err.source();
    }
    s
}

fn arg_str<'a>(
    args: &'a [Value],
    i: usize,
    method: &str,
) -> Result<Option<&'a str>, minijinja::Error> {
    match args.get(i) {
        None => Ok(None),
        Some(v) if v.is_none() || v.is_undefined() => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or_else(|| {
            minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("{method}(): argument {} must be a string", i + 1),
            )
        }),
    }
}

/// Python methods on strings, maps and lists that minijinja does not have.
fn python_method(
    _state: &State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, minijinja::Error> {
    let unknown = || {
        minijinja::Error::new(
            ErrorKind::UnknownMethod,
            format!("no method `{method}` on {}", value.kind()),
        )
    };
    match value.kind() {
        ValueKind::String => {
            let s = value.as_str().unwrap_or_default();
            let chars = args.first().and_then(Value::as_str);
            let pat = |c: char| chars.map_or(c.is_whitespace(), |set| set.contains(c));
            Ok(match method {
                "strip" => Value::from(s.trim_matches(pat)),
                "lstrip" => Value::from(s.trim_start_matches(pat)),
                "rstrip" => Value::from(s.trim_end_matches(pat)),
                "upper" => Value::from(s.to_uppercase()),
                "lower" => Value::from(s.to_lowercase()),
                "capitalize" => {
                    let mut c = s.chars();
                    Value::from(match c.next() {
                        Some(f) => f
                            .to_uppercase()
                            .chain(c.flat_map(char::to_lowercase))
                            .collect::<String>(),
                        None => String::new(),
                    })
                }
                "title" => {
                    let mut out = String::with_capacity(s.len());
                    let mut prev_alpha = false;
                    for c in s.chars() {
                        if prev_alpha {
                            out.extend(c.to_lowercase());
                        } else {
                            out.extend(c.to_uppercase());
                        }
                        prev_alpha = c.is_alphabetic();
                    }
                    Value::from(out)
                }
                "startswith" | "endswith" => {
                    let test = |p: &str| {
                        if method == "startswith" {
                            s.starts_with(p)
                        } else {
                            s.ends_with(p)
                        }
                    };
                    match args.first() {
                        Some(v) if v.kind() == ValueKind::Seq => {
                            let mut any = false;
                            for p in v.try_iter()? {
                                any |= p.as_str().is_some_and(test);
                            }
                            Value::from(any)
                        }
                        _ => Value::from(chars.is_some_and(test)),
                    }
                }
                "replace" => {
                    let (Some(from), Some(to)) = (chars, arg_str(args, 1, method)?) else {
                        return Err(minijinja::Error::new(
                            ErrorKind::MissingArgument,
                            "replace(old, new)",
                        ));
                    };
                    match args.get(2).and_then(|c| i64::try_from(c.clone()).ok()) {
                        Some(n) if n >= 0 => Value::from(s.replacen(from, to, n as usize)),
                        _ => Value::from(s.replace(from, to)),
                    }
                }
                "split" => {
                    let maxsplit = args
                        .get(1)
                        .and_then(|c| i64::try_from(c.clone()).ok())
                        .filter(|&n| n >= 0);
                    let parts: Vec<String> = match (chars, maxsplit) {
                        (Some(sep), Some(n)) => {
                            s.splitn(n as usize + 1, sep).map(String::from).collect()
                        }
                        (Some(sep), None) => s.split(sep).map(String::from).collect(),
                        (None, Some(n)) => {
                            let mut v: Vec<String> = Vec::new();
                            let mut rest = s.trim_start();
                            while !rest.is_empty() && v.len() < n as usize {
                                let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
                                v.push(rest[..end].to_string());
                                rest = rest[end..].trim_start();
                            }
                            if !rest.is_empty() {
                                v.push(rest.to_string());
                            }
                            v
                        }
                        (None, None) => s.split_whitespace().map(String::from).collect(),
                    };
                    Value::from(parts)
                }
                "splitlines" => Value::from(s.lines().map(String::from).collect::<Vec<_>>()),
                "find" => Value::from(
                    chars
                        .and_then(|p| s.find(p))
                        .map_or(-1, |b| s[..b].chars().count() as i64),
                ),
                "count" => Value::from(chars.map_or(0, |p| {
                    if p.is_empty() {
                        s.chars().count() + 1
                    } else {
                        s.matches(p).count()
                    }
                })),
                "join" => {
                    let mut out = String::new();
                    if let Some(seq) = args.first() {
                        for (i, item) in seq.try_iter()?.enumerate() {
                            if i > 0 {
                                out.push_str(s);
                            }
                            out.push_str(&item.to_string());
                        }
                    }
                    Value::from(out)
                }
                "isdigit" => Value::from(!s.is_empty() && s.chars().all(|c| c.is_ascii_digit())),
                "isspace" => Value::from(!s.is_empty() && s.chars().all(char::is_whitespace)),
                _ => return Err(unknown()),
            })
        }
        ValueKind::Map => match method {
            "items" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    let v = value.get_item(&k)?;
                    out.push(Value::from(vec![k, v]));
                }
                Ok(Value::from(out))
            }
            "keys" => Ok(Value::from(value.try_iter()?.collect::<Vec<_>>())),
            "values" => {
                let mut out = Vec::new();
                for k in value.try_iter()? {
                    out.push(value.get_item(&k)?);
                }
                Ok(Value::from(out))
            }
            "get" => {
                let key = args.first().cloned().unwrap_or_default();
                let v = value.get_item(&key)?;
                Ok(if v.is_undefined() {
                    args.get(1).cloned().unwrap_or(Value::from(()))
                } else {
                    v
                })
            }
            _ => Err(unknown()),
        },
        _ => Err(unknown()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing: minijinja's `divisibleby` panicked on a zero divisor.
    #[test]
    fn divisibleby_zero_does_not_panic() {
        let t = ChatTemplate::new(
            "{{ 4 is divisibleby 0 }} {{ 4 is divisibleby 2 }} {{ 5 is divisibleby 2 }} \
             {{ 4.5 is divisibleby 1.5 }} {{ 1.0 is divisibleby 0.0 }} {{ 'a' is divisibleby 2 }}",
            "",
            "",
        )
        .unwrap();
        assert_eq!(
            t.render(&[], false).unwrap(),
            "False True False True False False"
        );
    }

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    const QWEN2: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' + message.content.strip() + '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

    #[test]
    fn smollm2_chatml_default_system() {
        let t = ChatTemplate::new(SMOLLM2, "<|im_start|>", "<|im_end|>").unwrap();
        let out = t.render(&[ChatMessage::new("user", "Hi!")], true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    ChatMessage::new("system", "Be brief."),
                    ChatMessage::new("user", "Hi!"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        );
    }

    #[test]
    fn qwen2_template_with_system_default_and_strip() {
        let t = ChatTemplate::new(QWEN2, "", "<|im_end|>").unwrap();
        let msgs = [
            ChatMessage::new("user", "2+2?"),
            ChatMessage::new("assistant", "  4 \n"),
            ChatMessage::new("user", "thanks"),
        ];
        let out = t.render(&msgs, true).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n\
             <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n\
             <|im_start|>user\nthanks<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t
            .render(
                &[
                    ChatMessage::new("system", "S"),
                    ChatMessage::new("user", "u"),
                ],
                false,
            )
            .unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nu<|im_end|>\n"
        );
    }

    #[test]
    fn hf_conventions() {
        // trim_blocks / lstrip_blocks, bos_token, raise_exception, python methods.
        let tpl = "{{ bos_token }}\n{% for m in messages %}\n  {% if m.role not in ['user', 'assistant'] %}\n{{ raise_exception('bad role ' + m.role) }}\n  {% endif %}\n[{{ m.role.upper() }}] {{ m.content.lstrip('-') }}{% if m.content.startswith(('-', 'x')) %}!{% endif %}{{ eos_token }}\n{% endfor %}\n{% for k, v in {'a': 1}.items() %}{{ k }}={{ v }}{% endfor %}";
        let t = ChatTemplate::new(tpl, "<s>", "</s>").unwrap();
        let out = t
            .render(&[ChatMessage::new("user", "--hi")], false)
            .unwrap();
        assert_eq!(out, "<s>\n[USER] hi!</s>\na=1");
        match t.render(&[ChatMessage::new("tool", "x")], false) {
            Err(ChatError::Raised(msg)) => assert_eq!(msg, "bad role tool"),
            other => panic!("expected Raised, got {other:?}"),
        }
    }

    #[test]
    fn errors() {
        let e = ChatTemplate::new("{% for %}", "", "").unwrap_err();
        assert!(matches!(e, ChatError::Parse(_)), "{e}");
        let t = ChatTemplate::new("{{ messages[0].content.nosuchmethod() }}", "", "").unwrap();
        assert!(matches!(
            t.render(&[ChatMessage::new("user", "x")], false),
            Err(ChatError::Render(_))
        ));
    }
}
