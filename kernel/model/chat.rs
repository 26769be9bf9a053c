//! Decoder tokenizers and chat prompts. A GGUF file carries its vocabulary:
//! for byte-level BPE models (`tokenizer.ggml.model = "gpt2"`, as SmolLM2,
//! Llama 3 and Qwen use) the tokens and merges are rebuilt into a
//! `tokenizers` BPE with a byte-level pre-tokenizer; control tokens (type 3)
//! are special, so `<|im_start|>` in a prompt is one token.

use tokenizers::{
    AddedToken, Tokenizer,
    decoders::byte_level::ByteLevel as ByteLevelDecoder,
    models::bpe::{BPE, Vocab},
    pre_tokenizers::{PreTokenizerWrapper, byte_level::ByteLevel, digits::Digits, sequence::Sequence},
};

use std::path::Path;

use super::{
    gguf::{GgufFile, MetaValue},
    hf_folder::read_json,
};
use crate::error::{Error, Result};

/// ggml's token types.
const CONTROL: u64 = 3;
const USER_DEFINED: u64 = 4;

pub struct ChatTokenizer {
    tokenizer: Tokenizer,
    pub bos: Option<u32>,
    pub eos: u32,
    /// The template's end-of-turn token (`<|im_end|>`), which also ends a reply.
    end_of_turn: Option<u32>,
    template: ChatTemplate,
}

/// How conversations become prompt text: the template families aitl
/// renders natively (a Jinja engine for arbitrary templates is not worth its
/// weight for these few layouts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n`
    /// (SmolLM2, Qwen).
    ChatMl,
    /// `<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>`, then
    /// the assistant's header (Llama 3).
    Llama3,
    /// `[INST] {user} [/INST]{assistant}</s>` (Mistral, Mixtral): no system
    /// role, turns must alternate starting with the user.
    Mistral,
}

impl ChatTemplate {
    /// The family of a model's Jinja chat template.
    fn recognise(template: &str) -> std::result::Result<Self, &'static str> {
        if template.contains("<|im_start|>") {
            Ok(ChatTemplate::ChatMl)
        } else if template.contains("<|start_header_id|>") {
            Ok(ChatTemplate::Llama3)
        } else if template.contains("[INST]") {
            Ok(ChatTemplate::Mistral)
        } else {
            Err("the chat template is missing or of an unsupported family; aitl renders ChatML \
                 (<|im_start|> … <|im_end|>), Llama 3 (<|start_header_id|> … <|eot_id|>) and Mistral \
                 ([INST] … [/INST]) templates")
        }
    }

    fn end_of_turn(self) -> &'static str {
        match self {
            ChatTemplate::ChatMl => "<|im_end|>",
            ChatTemplate::Llama3 => "<|eot_id|>",
            ChatTemplate::Mistral => "</s>",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

impl ChatTokenizer {
    pub fn from_gguf(file: &GgufFile) -> Result<Self> {
        let bad = |why: String| Error::InvalidArgument(format!("{}: {why}", file.path()));
        let model = file.meta_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(bad(format!(
                "tokenizer model {model:?}; aitl rebuilds byte-level BPE (\"gpt2\") vocabularies"
            )));
        }
        let strings = |key: &str| -> Result<Vec<String>> {
            file.meta(key)
                .and_then(MetaValue::as_array)
                .ok_or_else(|| bad(format!("{key} is missing")))?
                .iter()
                .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| bad(format!("{key} holds a non-string"))))
                .collect()
        };
        let tokens = strings("tokenizer.ggml.tokens")?;
        let merges: Vec<(String, String)> = strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ').map(|(a, b)| (a.to_owned(), b.to_owned())).ok_or_else(|| bad(format!("merge {m:?}")))
            })
            .collect::<Result<_>>()?;
        let types: Vec<u64> = file
            .meta("tokenizer.ggml.token_type")
            .and_then(MetaValue::as_array)
            .map(|a| a.iter().map(|v| v.as_u64().unwrap_or(1)).collect())
            .unwrap_or_default();
        let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| bad(format!("cannot build the BPE vocabulary: {e}")))?;
        let mut tokenizer = Tokenizer::new(bpe);
        // Digits one by one, then GPT-2's byte-level split (llama.cpp's "smollm"/"llama3" pre-tokenizers).
        let pre: Vec<PreTokenizerWrapper> = match file.meta_str("tokenizer.ggml.pre").unwrap_or("default") {
            "smollm" | "llama3" | "llama-bpe" => {
                vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]
            }
            _ => vec![ByteLevel::new(false, true, true).into()],
        };
        tokenizer.with_pre_tokenizer(Some(Sequence::new(pre)));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == CONTROL || **t == USER_DEFINED)
            .map(|(token, _)| AddedToken::from(token.clone(), true))
            .collect();
        tokenizer.add_special_tokens(special).map_err(|e| bad(format!("special tokens: {e}")))?;
        let id = |key: &str| file.meta_u64(key).ok().map(|v| v as u32);
        let eos =
            id("tokenizer.ggml.eos_token_id").ok_or_else(|| bad("tokenizer.ggml.eos_token_id is missing".into()))?;
        let add_bos = file.meta("tokenizer.ggml.add_bos_token").is_some_and(|v| *v == MetaValue::Bool(true));
        let template = ChatTemplate::recognise(file.meta_str("tokenizer.chat_template").unwrap_or(""))
            .map_err(|why| bad(why.into()))?;
        Ok(ChatTokenizer {
            end_of_turn: tokenizer.token_to_id(template.end_of_turn()),
            bos: if add_bos { id("tokenizer.ggml.bos_token_id") } else { None },
            tokenizer,
            eos,
            template,
        })
    }

    /// A Hugging Face folder's `tokenizer.json` with the chat template and
    /// special tokens of `tokenizer_config.json` (or `chat_template.jinja`).
    pub fn from_hf_folder(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let bad = |why: String| Error::InvalidArgument(format!("{}: {why}", config_path.display()));
        let config: serde_json::Value = read_json(&config_path)?.unwrap_or_default();
        let template_text = match std::fs::read_to_string(dir.join("chat_template.jinja")) {
            Ok(text) => text,
            Err(_) => match &config["chat_template"] {
                serde_json::Value::String(text) => text.clone(),
                // Named templates: the default one.
                serde_json::Value::Array(named) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
                _ => String::new(),
            },
        };
        let template = ChatTemplate::recognise(&template_text).map_err(|why| bad(why.into()))?;
        let tokenizer = super::hf_folder::tokenizer(dir, None)?;
        // A token given as "<s>" or as {"content": "<s>", …}.
        let special = |key: &str| -> Option<u32> {
            let value = &config[key];
            tokenizer.token_to_id(value.as_str().or_else(|| value["content"].as_str())?)
        };
        let eos = special("eos_token")
            .or_else(|| tokenizer.token_to_id(template.end_of_turn()))
            .ok_or_else(|| bad("names no eos_token the tokenizer knows".into()))?;
        Ok(ChatTokenizer {
            end_of_turn: tokenizer.token_to_id(template.end_of_turn()),
            // Templates that start with the BOS token write `{{ bos_token }}`.
            bos: if template_text.contains("bos_token") { special("bos_token") } else { None },
            tokenizer,
            eos,
            template,
        })
    }

    /// Token ids of `text`, special tokens recognised.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding =
            self.tokenizer.encode(text, false).map_err(|e| Error::InvalidArgument(format!("tokenizer: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(self.bos);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Internal(format!("tokenizer: {e}")))
    }

    pub fn is_end_of_turn(&self, token: u32) -> bool {
        self.end_of_turn == Some(token)
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// The prompt text for a conversation, ending where the assistant speaks.
    pub fn render(&self, messages: &[(Role, &str)]) -> String {
        render(self.template, messages)
    }
}

fn render(template: ChatTemplate, messages: &[(Role, &str)]) -> String {
    if template == ChatTemplate::Mistral {
        return render_mistral(messages);
    }
    let mut out = String::new();
    for (role, content) in messages {
        let role = match role {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        match template {
            ChatTemplate::ChatMl => out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n")),
            // Llama 3's template trims each message.
            ChatTemplate::Llama3 => {
                out.push_str(&format!("<|start_header_id|>{role}<|end_header_id|>\n\n{}<|eot_id|>", content.trim()))
            }
            ChatTemplate::Mistral => unreachable!("rendered by render_mistral"),
        }
    }
    out.push_str(match template {
        ChatTemplate::ChatMl => "<|im_start|>assistant\n",
        ChatTemplate::Llama3 => "<|start_header_id|>assistant<|end_header_id|>\n\n",
        ChatTemplate::Mistral => unreachable!("rendered by render_mistral"),
    });
    out
}

/// Mistral's template has no system role and raises unless user and
/// assistant alternate from a user turn. So the system prompt opens the
/// first user turn, consecutive turns of one role are joined, and a
/// conversation that starts with the assistant gets a user turn of the
/// system prompt (or an empty one) before it. The prompt ends after the
/// last `[/INST]`, where the assistant speaks.
fn render_mistral(messages: &[(Role, &str)]) -> String {
    let system: Vec<&str> =
        messages.iter().filter(|(r, _)| *r == Role::System).map(|(_, c)| c.trim()).filter(|c| !c.is_empty()).collect();
    let mut turns: Vec<(Role, String)> = Vec::new();
    for (role, content) in messages.iter().filter(|(r, _)| *r != Role::System) {
        match turns.last_mut() {
            Some((last, text)) if last == role => {
                text.push_str("\n\n");
                text.push_str(content.trim());
            }
            _ => turns.push((*role, content.trim().to_string())),
        }
    }
    if turns.first().is_none_or(|(role, _)| *role == Role::Assistant) {
        turns.insert(0, (Role::User, String::new()));
    }
    if !system.is_empty() {
        let first = &mut turns[0].1;
        *first = if first.is_empty() { system.join("\n\n") } else { format!("{}\n\n{first}", system.join("\n\n")) };
    }
    let mut out = String::new();
    for (role, content) in &turns {
        match role {
            Role::User => out.push_str(&format!("[INST] {content} [/INST]")),
            _ => out.push_str(&format!("{content}</s>")),
        }
    }
    // A conversation that ends with the assistant still needs the model to continue as the assistant.
    if turns.last().is_some_and(|(role, _)| *role == Role::Assistant) {
        out.push_str("[INST]  [/INST]");
    }
    out
}

#[cfg(test)]
mod template_tests {
    use super::{ChatTemplate, Role, render};

    #[test]
    fn templates_are_recognised_by_their_markers() {
        assert_eq!(ChatTemplate::recognise("{{'<|im_start|>' + role}}"), Ok(ChatTemplate::ChatMl));
        assert_eq!(ChatTemplate::recognise("{{ '<|start_header_id|>' }}"), Ok(ChatTemplate::Llama3));
        assert_eq!(ChatTemplate::recognise("{{ '[INST] ' + content + ' [/INST]' }}"), Ok(ChatTemplate::Mistral));
        assert!(ChatTemplate::recognise("{{ '### Human: ' + content }}").unwrap_err().contains("ChatML"));
        assert!(ChatTemplate::recognise("").is_err());
    }

    #[test]
    fn llama3_renders_headers_and_trims_content() {
        let text = render(ChatTemplate::Llama3, &[(Role::System, "Be brief. "), (Role::User, "Hi")]);
        assert_eq!(
            text,
            "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    /// As Mixtral-8x7B-Instruct's Jinja template renders an alternating
    /// conversation (without its leading BOS, which the tokenizer adds), with
    /// the system prompt folded into the first user turn.
    #[test]
    fn mistral_folds_the_system_prompt_and_merges_turns() {
        let text = render(
            ChatTemplate::Mistral,
            &[
                (Role::System, "Cite sources."),
                (Role::User, "Hi"),
                (Role::Assistant, "Hello!"),
                (Role::User, "Parking?"),
                (Role::User, " Is it free? "),
            ],
        );
        assert_eq!(text, "[INST] Cite sources.\n\nHi [/INST]Hello!</s>[INST] Parking?\n\nIs it free? [/INST]");
        let text = render(ChatTemplate::Mistral, &[(Role::Assistant, "How can I help?"), (Role::User, "Pets?")]);
        assert_eq!(text, "[INST]  [/INST]How can I help?</s>[INST] Pets? [/INST]");
    }
}
