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

use super::gguf::{GgufFile, MetaValue};
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

/// How conversations become prompt text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatTemplate {
    /// `<|im_start|>{role}\n{content}<|im_end|>\n`, then `<|im_start|>assistant\n`.
    ChatMl,
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
        tokenizer.add_special_tokens(&special);
        let id = |key: &str| file.meta_u64(key).ok().map(|v| v as u32);
        let eos =
            id("tokenizer.ggml.eos_token_id").ok_or_else(|| bad("tokenizer.ggml.eos_token_id is missing".into()))?;
        let add_bos = file.meta("tokenizer.ggml.add_bos_token").is_some_and(|v| *v == MetaValue::Bool(true));
        let template_text = file.meta_str("tokenizer.chat_template").unwrap_or("");
        if !template_text.contains("<|im_start|>") {
            return Err(bad("only ChatML chat templates (<|im_start|> … <|im_end|>) are supported".into()));
        }
        let end_of_turn = tokenizer.token_to_id("<|im_end|>");
        Ok(ChatTokenizer {
            tokenizer,
            bos: if add_bos { id("tokenizer.ggml.bos_token_id") } else { None },
            eos,
            end_of_turn,
            template: ChatTemplate::ChatMl,
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
        match self.template {
            ChatTemplate::ChatMl => {
                let mut out = String::new();
                for (role, content) in messages {
                    let role = match role {
                        Role::System => "system",
                        Role::User => "user",
                        Role::Assistant => "assistant",
                    };
                    out.push_str(&format!("<|im_start|>{role}\n{content}<|im_end|>\n"));
                }
                out.push_str("<|im_start|>assistant\n");
                out
            }
        }
    }
}
