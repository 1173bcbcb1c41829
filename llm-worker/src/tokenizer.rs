//! The LLaMA-2 / Vicuna v1.5 tokenizer exactly as Osprey runs it (docs/MODEL.md#tokenizer).
//!
//! Osprey loads `AutoTokenizer(use_fast=True)` with transformers 4.31, which converts the
//! SentencePiece `tokenizer.model` with `LlamaConverter` into a `tokenizers` pipeline, then calls
//! `add_tokens(["<mask>", "<pos>"], special_tokens=True)`. We rebuild that pipeline here from the
//! parsed `tokenizer.model` (a SentencePiece `ModelProto`, decoded with the few prost messages
//! below), so no `tokenizer.json` is needed:
//!
//! - normalizer `Sequence[Prepend("▁"), Replace(" ", "▁")]`, no pre-tokenizer;
//! - BPE over the pieces (id = index) with `byte_fallback`, `fuse_unk`, unk `<unk>`, and merges
//!   derived from the vocabulary the way transformers' `SentencePieceExtractor` does;
//! - decoder `Sequence[Replace("▁", " "), ByteFallback, Fuse, Strip(" ", 1, 0)]`;
//! - post-processor `<s> $A` (BOS only); special added tokens `<unk>`, `<s>`, `</s>`, `<mask>`,
//!   `<pos>` (not normalized, no lstrip/rstrip).
//!
//! Quirks this reproduces on purpose (the model was trained and is served with them): text on each
//! side of an added token is normalized as its own segment, so a space before `<mask>` becomes a
//! lone `▁` (29871) and the text after `<pos>` starts with a dummy-prefix `▁`.
//!
//! Upstream: transformers v4.31.0 `convert_slow_tokenizer.py` (`LlamaConverter`,
//! `SentencePieceExtractor`), Osprey `osprey/mm_utils.py::tokenizer_image_token`, SentencePiece
//! `src/sentencepiece_model.proto`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use prost::Message;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::{Prepend, Sequence as NormalizerSequence};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer};

/// The sentinel id `tokenizer_image_token` puts where the image tokens go (`IMAGE_TOKEN_INDEX`).
pub const IMAGE_TOKEN_INDEX: i64 = -200;
/// The literal that marks the image in a prompt; not a vocabulary token.
pub const IMAGE_PLACEHOLDER: &str = "<image>";
/// Placeholder of a region's mask-feature token.
pub const MASK_TOKEN: &str = "<mask>";
/// Placeholder of a region's position (mask-geometry) token; always right after `<mask>`.
pub const POS_TOKEN: &str = "<pos>";

const SPIECE_UNDERLINE: &str = "\u{2581}";

/// Why a tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a SentencePiece model: {source}")]
    Proto {
        path: PathBuf,
        #[source]
        source: prost::DecodeError,
    },
    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no tokenizer in {dir}: expected tokenizer.json or tokenizer.model")]
    NotFound { dir: PathBuf },
    /// The SentencePiece model is not the kind this pipeline reproduces (LLaMA-style BPE).
    #[error("unsupported SentencePiece model: {0}")]
    Unsupported(String),
    /// An added token did not get the id `added_tokens.json` gives it.
    #[error("added token {token:?} got id {got}, expected {expected}")]
    AddedTokenId { token: String, expected: u32, got: u32 },
    #[error("token {0:?} is not in the vocabulary")]
    MissingToken(String),
    #[error("tokenizers: {0}")]
    Tokenizers(String),
}

impl From<tokenizers::Error> for TokenizerError {
    fn from(err: tokenizers::Error) -> Self {
        Self::Tokenizers(err.to_string())
    }
}

/// The subset of SentencePiece's `sentencepiece_model.proto` (proto2) that the converter reads.
/// Fields absent from the file decode as `None`; the proto2 defaults are applied where read.
mod spm {
    #[derive(Clone, PartialEq, prost::Message)]
    pub struct ModelProto {
        #[prost(message, repeated, tag = "1")]
        pub pieces: Vec<SentencePiece>,
        #[prost(message, optional, tag = "2")]
        pub trainer_spec: Option<TrainerSpec>,
        #[prost(message, optional, tag = "3")]
        pub normalizer_spec: Option<NormalizerSpec>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct SentencePiece {
        #[prost(string, optional, tag = "1")]
        pub piece: Option<String>,
        #[prost(float, optional, tag = "2")]
        pub score: Option<f32>,
        /// `PieceType`; proto2 default NORMAL.
        #[prost(enumeration = "PieceType", optional, tag = "3")]
        pub r#type: Option<i32>,
    }

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
    #[repr(i32)]
    pub enum PieceType {
        Normal = 1,
        Unknown = 2,
        Control = 3,
        UserDefined = 4,
        Unused = 5,
        Byte = 6,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct TrainerSpec {
        /// 1 = UNIGRAM (proto2 default), 2 = BPE, 3 = WORD, 4 = CHAR.
        #[prost(int32, optional, tag = "3")]
        pub model_type: Option<i32>,
        #[prost(int32, optional, tag = "4")]
        pub vocab_size: Option<i32>,
        #[prost(bool, optional, tag = "35")]
        pub byte_fallback: Option<bool>,
        #[prost(int32, optional, tag = "40")]
        pub unk_id: Option<i32>,
        #[prost(int32, optional, tag = "41")]
        pub bos_id: Option<i32>,
        #[prost(int32, optional, tag = "42")]
        pub eos_id: Option<i32>,
        #[prost(int32, optional, tag = "43")]
        pub pad_id: Option<i32>,
        #[prost(string, optional, tag = "45")]
        pub unk_piece: Option<String>,
        #[prost(string, optional, tag = "46")]
        pub bos_piece: Option<String>,
        #[prost(string, optional, tag = "47")]
        pub eos_piece: Option<String>,
    }

    #[derive(Clone, PartialEq, prost::Message)]
    pub struct NormalizerSpec {
        #[prost(string, optional, tag = "1")]
        pub name: Option<String>,
        #[prost(bool, optional, tag = "3")]
        pub add_dummy_prefix: Option<bool>,
        #[prost(bool, optional, tag = "4")]
        pub remove_extra_whitespaces: Option<bool>,
    }

    pub const MODEL_TYPE_BPE: i32 = 2;
}

/// The pieces of a SentencePiece model, as the converter sees them.
#[derive(Debug, Clone)]
pub struct SentencePieceModel {
    /// `(piece, score)`, id = index.
    pub pieces: Vec<(String, f32)>,
    pub unk_piece: String,
    pub bos_id: u32,
    pub eos_id: u32,
    pub byte_fallback: bool,
}

impl SentencePieceModel {
    /// Decodes a `tokenizer.model` file's bytes.
    pub fn from_bytes(bytes: &[u8], path: &Path) -> Result<Self, TokenizerError> {
        let proto = spm::ModelProto::decode(bytes)
            .map_err(|source| TokenizerError::Proto { path: path.to_path_buf(), source })?;
        let trainer = proto.trainer_spec.unwrap_or_default();
        let model_type = trainer.model_type.unwrap_or(1);
        if model_type != spm::MODEL_TYPE_BPE {
            return Err(TokenizerError::Unsupported(format!(
                "model_type {model_type} (only BPE = 2, the LLaMA tokenizer, is reproduced)"
            )));
        }
        if let Some(spec) = &proto.normalizer_spec {
            // LlamaConverter ignores the normalizer spec and always prepends "▁" and maps spaces;
            // that is only faithful for the identity/dummy-prefix spec LLaMA ships.
            if spec.name.as_deref().is_some_and(|n| n != "identity") {
                return Err(TokenizerError::Unsupported(format!(
                    "normalizer {:?} (only \"identity\" is reproduced)",
                    spec.name
                )));
            }
        }
        let mut pieces = Vec::with_capacity(proto.pieces.len());
        for (id, p) in proto.pieces.into_iter().enumerate() {
            let kind = p.r#type.unwrap_or(spm::PieceType::Normal as i32);
            let piece = p.piece.unwrap_or_default();
            // LlamaConverter.vocab() gives <unk>, <s>, </s> (ids 0..3) score 0; so do control and
            // unknown pieces in LLaMA's file anyway.
            let score =
                if id < 3 || kind == spm::PieceType::Control as i32 || kind == spm::PieceType::Unknown as i32
                {
                    0.0
                } else {
                    p.score.unwrap_or(0.0)
                };
            pieces.push((piece, score));
        }
        let id = |v: Option<i32>, default: i32, what: &str| -> Result<u32, TokenizerError> {
            let v = v.unwrap_or(default);
            u32::try_from(v)
                .ok()
                .filter(|&v| (v as usize) < pieces.len())
                .ok_or_else(|| TokenizerError::Unsupported(format!("{what} {v} is not a piece id")))
        };
        Ok(Self {
            bos_id: id(trainer.bos_id, 1, "bos_id")?,
            eos_id: id(trainer.eos_id, 2, "eos_id")?,
            unk_piece: trainer.unk_piece.unwrap_or_else(|| "<unk>".to_string()),
            byte_fallback: trainer.byte_fallback.unwrap_or(false),
            pieces,
        })
    }

    /// BPE merges as transformers 4.31's `SentencePieceExtractor.extract(vocab_scores)` builds
    /// them: every way of writing a piece as the concatenation of two vocabulary pieces, for every
    /// piece whose score is truthy (non-zero: byte and control pieces never get merges), ordered
    /// by the merged piece's score, highest first. The Python loops over (left id, right id) and
    /// sorts stably, so equal scores keep (left id, right id) order, which we sort by explicitly.
    pub fn merges(&self) -> Vec<(String, String)> {
        let ids: HashMap<&str, usize> =
            self.pieces.iter().enumerate().map(|(i, (p, _))| (p.as_str(), i)).collect();
        let mut merges: Vec<(f32, usize, usize)> = Vec::new();
        for (piece, score) in &self.pieces {
            if *score == 0.0 {
                continue;
            }
            for (cut, _) in piece.char_indices().skip(1) {
                if let (Some(&l), Some(&r)) = (ids.get(&piece[..cut]), ids.get(&piece[cut..])) {
                    merges.push((*score, l, r));
                }
            }
        }
        merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
        merges.into_iter().map(|(_, l, r)| (self.pieces[l].0.clone(), self.pieces[r].0.clone())).collect()
    }
}

/// The Osprey tokenizer: the fast LLaMA tokenizer plus `<mask>`/`<pos>` and the `<image>` split.
#[derive(Clone)]
pub struct OspreyTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    mask_id: u32,
    pos_id: u32,
}

impl std::fmt::Debug for OspreyTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OspreyTokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("mask_id", &self.mask_id)
            .field("pos_id", &self.pos_id)
            .finish()
    }
}

impl OspreyTokenizer {
    /// Loads the tokenizer of a checkpoint directory: `tokenizer.json` when present (used as is),
    /// otherwise `tokenizer.model` rebuilt like transformers 4.31. `<mask>`/`<pos>` are then added
    /// as special tokens unless already there, and must get the ids `added_tokens.json` lists.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let json = dir.join("tokenizer.json");
        let model = dir.join("tokenizer.model");
        let mut inner = if json.is_file() {
            Tokenizer::from_file(&json)?
        } else if model.is_file() {
            let bytes =
                std::fs::read(&model).map_err(|source| TokenizerError::Io { path: model.clone(), source })?;
            build_fast_tokenizer(&SentencePieceModel::from_bytes(&bytes, &model)?)?
        } else {
            return Err(TokenizerError::NotFound { dir: dir.to_path_buf() });
        };
        let added = read_added_tokens(&dir.join("added_tokens.json"))?;
        add_region_tokens(&mut inner, &added)?;
        Self::from_tokenizer(inner)
    }

    /// Builds from the bytes of a SentencePiece `tokenizer.model` and adds `<mask>`, `<pos>`.
    pub fn from_sentencepiece(bytes: &[u8]) -> Result<Self, TokenizerError> {
        let model = SentencePieceModel::from_bytes(bytes, Path::new("tokenizer.model"))?;
        let mut inner = build_fast_tokenizer(&model)?;
        add_region_tokens(&mut inner, &[])?;
        Self::from_tokenizer(inner)
    }

    /// Loads a tokenizer serialized with its `<mask>`/`<pos>` tokens (`Tokenizer::to_string`
    /// of [`Self::inner`]), as a GGUF file written by `llm-worker quantize` carries it.
    pub fn from_json(text: &str) -> Result<Self, TokenizerError> {
        let inner: Tokenizer = text.parse()?;
        Self::from_tokenizer(inner)
    }

    fn from_tokenizer(inner: Tokenizer) -> Result<Self, TokenizerError> {
        let id = |t: &str| inner.token_to_id(t).ok_or_else(|| TokenizerError::MissingToken(t.to_string()));
        Ok(Self {
            bos_id: id("<s>")?,
            eos_id: id("</s>")?,
            mask_id: id(MASK_TOKEN)?,
            pos_id: id(POS_TOKEN)?,
            inner,
        })
    }

    /// `tok(text).input_ids`: the ids of `text`, with BOS when `add_bos`.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        Ok(self.inner.encode(text, add_bos)?.get_ids().to_vec())
    }

    /// `osprey.mm_utils.tokenizer_image_token`: every `<image>`-separated chunk is tokenized on its
    /// own with BOS; the BOS is kept only on chunk 0, the first id of every later chunk is dropped,
    /// and the chunks are joined with [`IMAGE_TOKEN_INDEX`]. (So the text after `<image>` starts
    /// with a dummy-prefix `▁` like a fresh string.)
    pub fn tokenizer_image_token(&self, prompt: &str) -> Result<Vec<i64>, TokenizerError> {
        let chunks: Vec<Vec<u32>> =
            prompt.split(IMAGE_PLACEHOLDER).map(|c| self.encode(c, true)).collect::<Result<_, _>>()?;
        let keep_bos = chunks.first().and_then(|c| c.first()) == Some(&self.bos_id);
        let offset = usize::from(keep_bos);
        let mut ids: Vec<i64> = Vec::new();
        if keep_bos {
            ids.push(i64::from(self.bos_id));
        }
        for (i, chunk) in chunks.iter().enumerate() {
            if i > 0 {
                ids.push(IMAGE_TOKEN_INDEX);
            }
            ids.extend(chunk.iter().skip(offset).map(|&t| i64::from(t)));
        }
        Ok(ids)
    }

    /// `tok.decode(ids, skip_special_tokens)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        Ok(self.inner.decode(ids, skip_special_tokens)?)
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn mask_id(&self) -> u32 {
        self.mask_id
    }

    pub fn pos_id(&self) -> u32 {
        self.pos_id
    }

    /// The underlying `tokenizers` pipeline (e.g. for `decode_stream`).
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// transformers 4.31 `LlamaConverter` + `LlamaTokenizerFast` post-processor, from the pieces.
pub fn build_fast_tokenizer(model: &SentencePieceModel) -> Result<Tokenizer, TokenizerError> {
    let vocab: Vocab = model.pieces.iter().enumerate().map(|(i, (p, _))| (p.clone(), i as u32)).collect();
    if vocab.len() != model.pieces.len() {
        return Err(TokenizerError::Unsupported("duplicate pieces".into()));
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, model.merges())
        .unk_token(model.unk_piece.clone())
        .fuse_unk(true)
        .byte_fallback(model.byte_fallback)
        .build()?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_normalizer(Some(NormalizerSequence::new(vec![
        Prepend::new(SPIECE_UNDERLINE.to_string()).into(),
        Replace::new(" ", SPIECE_UNDERLINE)?.into(),
    ])))?;
    tok.with_decoder(Some(DecoderSequence::new(vec![
        Replace::new(SPIECE_UNDERLINE, " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
        Strip::new(' ', 1, 0).into(),
    ])));
    let piece = |id: u32| model.pieces[id as usize].0.clone();
    let bos = piece(model.bos_id);
    let template = TemplateProcessing::builder()
        .try_single(format!("{bos}:0 $A:0"))
        .map_err(TokenizerError::Tokenizers)?
        .try_pair(format!("{bos}:0 $A:0 {bos}:1 $B:1"))
        .map_err(TokenizerError::Tokenizers)?
        .special_tokens(vec![(bos.clone(), model.bos_id)])
        .build()
        .map_err(|e| TokenizerError::Tokenizers(e.to_string()))?;
    tok.with_post_processor(Some(template));
    // The converter's own special tokens (already in the vocabulary, so ids are unchanged).
    let specials: Vec<AddedToken> = [model.unk_piece.clone(), bos, piece(model.eos_id)]
        .into_iter()
        .map(|t| AddedToken::from(t, true))
        .collect();
    tok.add_special_tokens(specials)?;
    Ok(tok)
}

/// `added_tokens.json` (`{"<mask>": 32000, "<pos>": 32001}`), sorted by id; empty when absent.
fn read_added_tokens(path: &Path) -> Result<Vec<(String, u32)>, TokenizerError> {
    if !path.is_file() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(path)
        .map_err(|source| TokenizerError::Io { path: path.to_path_buf(), source })?;
    let map: HashMap<String, u32> = serde_json::from_str(&text)
        .map_err(|source| TokenizerError::Json { path: path.to_path_buf(), source })?;
    let mut added: Vec<(String, u32)> = map.into_iter().collect();
    added.sort_by_key(|(_, id)| *id);
    Ok(added)
}

/// Osprey's `tokenizer.add_tokens(['<mask>', '<pos>'], special_tokens=True)`, after the tokens of
/// `added_tokens.json` (which the HF loader adds first, in id order). Each must land on its listed id.
fn add_region_tokens(tok: &mut Tokenizer, listed: &[(String, u32)]) -> Result<(), TokenizerError> {
    let mut wanted: Vec<(String, Option<u32>)> =
        listed.iter().map(|(t, id)| (t.clone(), Some(*id))).collect();
    for t in [MASK_TOKEN, POS_TOKEN] {
        if !wanted.iter().any(|(w, _)| w == t) {
            wanted.push((t.to_string(), None));
        }
    }
    for (token, expected) in wanted {
        if tok.get_added_vocabulary().get_vocab().get(&token).is_none() {
            tok.add_special_tokens([AddedToken::from(token.clone(), true)])?;
        }
        let got = tok.token_to_id(&token).ok_or_else(|| TokenizerError::MissingToken(token.clone()))?;
        if let Some(expected) = expected
            && got != expected
        {
            return Err(TokenizerError::AddedTokenId { token, expected, got });
        }
    }
    Ok(())
}
