//! The on-disk format: file names, the metadata every shard and the index
//! carry, the index file itself, and their checks.

use super::CacheError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// The `format` field of the index and of every shard's `__metadata__`.
pub const FORMAT: &str = "kdfuse-teacher-cache";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
/// The index file in the cache directory.
pub const INDEX_FILE: &str = "teacher_cache.index.json";
/// Tensor names in a shard.
pub const INDICES: &str = "indices";
/// See [`INDICES`].
pub const VALUES: &str = "values";
/// See [`INDICES`].
pub const LSE: &str = "lse";

/// The file name of shard `i`: `shard-00000.safetensors`, ….
pub fn shard_file(i: usize) -> String {
    format!("shard-{i:05}.safetensors")
}

/// What the stored values are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValuesKind {
    /// The teacher's logits at the k indices.
    Logits,
    /// The teacher's log-probabilities (logit − log-sum-exp over all V).
    Logprobs,
}

/// The dtype the values are stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValuesDtype {
    /// bfloat16 (half the bytes; the f32 values rounded to nearest even).
    Bf16,
    /// float32.
    F32,
}

impl ValuesKind {
    /// The spelling in files.
    pub fn as_str(self) -> &'static str {
        match self {
            ValuesKind::Logits => "logits",
            ValuesKind::Logprobs => "logprobs",
        }
    }
}

impl ValuesDtype {
    /// The spelling in files and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            ValuesDtype::Bf16 => "bf16",
            ValuesDtype::F32 => "f32",
        }
    }

    /// The safetensors dtype of the `values` tensor.
    pub fn safetensors(self) -> safetensors::Dtype {
        match self {
            ValuesDtype::Bf16 => safetensors::Dtype::BF16,
            ValuesDtype::F32 => safetensors::Dtype::F32,
        }
    }
}

impl std::str::FromStr for ValuesDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(ValuesDtype::Bf16),
            "f32" => Ok(ValuesDtype::F32),
            _ => Err(format!("values dtype `{s}`: expected bf16 or f32")),
        }
    }
}

/// What a cache holds, the same for every shard: a writer that appends must
/// bring the same.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheMeta {
    /// Entries per row.
    pub k: usize,
    /// The teacher's vocabulary size V (every index is in [0, V)).
    pub vocab_size: usize,
    /// The temperature already applied to the values, or `None`.
    pub temperature: Option<f64>,
    /// Free-form name of the teacher.
    pub teacher: String,
    /// Logits or log-probs.
    pub values_kind: ValuesKind,
    /// The values' storage dtype.
    pub values_dtype: ValuesDtype,
    /// Whether each shard holds `lse` (F32 [rows], the log-sum-exp of the
    /// row's logits over all V, after the temperature if any).
    pub with_lse: bool,
}

impl CacheMeta {
    /// Checks the fields: 1 ≤ k ≤ V, V fits an I32 index, a finite
    /// positive temperature.
    pub fn validate(&self) -> Result<(), CacheError> {
        if self.k == 0 || self.k > self.vocab_size {
            return Err(CacheError::Invalid(format!(
                "k = {} must be in [1, V = {}]",
                self.k, self.vocab_size
            )));
        }
        if self.vocab_size > i32::MAX as usize {
            return Err(CacheError::Invalid(format!(
                "vocab_size {} does not fit I32 indices",
                self.vocab_size
            )));
        }
        if let Some(t) = self.temperature {
            if !(t.is_finite() && t > 0.0) {
                return Err(CacheError::Invalid(format!(
                    "temperature {t} must be finite and > 0"
                )));
            }
        }
        Ok(())
    }

    /// The first field in which `other` differs, as `name = ours, not theirs`.
    pub fn mismatch(&self, other: &CacheMeta) -> Option<String> {
        let (a, b) = (self.to_header(), other.to_header());
        let mut keys: Vec<&String> = a.keys().collect();
        keys.sort();
        keys.into_iter()
            .find(|key| a.get(*key) != b.get(*key))
            .map(|key| {
                format!(
                    "{key} = {}, not {}",
                    a[key],
                    b.get(key).map_or("-", String::as_str)
                )
            })
    }

    /// The fields as a safetensors `__metadata__` map (strings only), with
    /// the format and its version.
    pub fn to_header(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        m.insert("format".into(), FORMAT.into());
        m.insert("format_version".into(), VERSION.to_string());
        m.insert("k".into(), self.k.to_string());
        m.insert("vocab_size".into(), self.vocab_size.to_string());
        m.insert(
            "temperature".into(),
            self.temperature.map_or("none".into(), |t| t.to_string()),
        );
        m.insert("teacher".into(), self.teacher.clone());
        m.insert("values_kind".into(), self.values_kind.as_str().into());
        m.insert("values_dtype".into(), self.values_dtype.as_str().into());
        m.insert("with_lse".into(), self.with_lse.to_string());
        m
    }

    /// Reads [`CacheMeta::to_header`]'s fields back (extra keys, such as
    /// the shard's rows, are ignored here).
    pub fn from_header(m: &HashMap<String, String>) -> Result<CacheMeta, CacheError> {
        let get = |key: &str| {
            m.get(key)
                .ok_or_else(|| CacheError::Invalid(format!("__metadata__ has no `{key}`")))
        };
        let bad = |key: &str, v: &str| CacheError::Invalid(format!("__metadata__ `{key}` = `{v}`"));
        let format = get("format")?;
        if format != FORMAT {
            return Err(bad("format", format));
        }
        let version = get("format_version")?;
        if version.parse::<u32>() != Ok(VERSION) {
            return Err(CacheError::Invalid(format!(
                "format version {version}, this build reads version {VERSION}"
            )));
        }
        let num = |key: &str| -> Result<usize, CacheError> {
            let v = get(key)?;
            v.parse().map_err(|_| bad(key, v))
        };
        let temperature = match get("temperature")?.as_str() {
            "none" => None,
            v => Some(v.parse::<f64>().map_err(|_| bad("temperature", v))?),
        };
        let values_kind = match get("values_kind")?.as_str() {
            "logits" => ValuesKind::Logits,
            "logprobs" => ValuesKind::Logprobs,
            v => return Err(bad("values_kind", v)),
        };
        let dt = get("values_dtype")?;
        let values_dtype = dt.parse().map_err(|_| bad("values_dtype", dt))?;
        let with_lse = match get("with_lse")?.as_str() {
            "true" => true,
            "false" => false,
            v => return Err(bad("with_lse", v)),
        };
        let meta = CacheMeta {
            k: num("k")?,
            vocab_size: num("vocab_size")?,
            temperature,
            teacher: get("teacher")?.clone(),
            values_kind,
            values_dtype,
            with_lse,
        };
        meta.validate()?;
        Ok(meta)
    }
}

/// One shard in the index: its file and its rows [start, end) of the cache.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// The file name, in the cache directory.
    pub file: String,
    /// The first row.
    pub start: u64,
    /// One past the last row.
    pub end: u64,
}

/// `teacher_cache.index.json`: the metadata and the shards in row order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Index {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// What every shard holds.
    pub metadata: CacheMeta,
    /// Rows in all shards.
    pub total_rows: u64,
    /// The shards, tiling [0, total_rows) in order.
    pub shards: Vec<ShardEntry>,
}

impl Index {
    /// An index with no shard.
    pub fn new(metadata: CacheMeta) -> Index {
        Index {
            format: FORMAT.into(),
            version: VERSION,
            metadata,
            total_rows: 0,
            shards: Vec::new(),
        }
    }

    /// Checks the format, the version, the metadata and that the shards
    /// tile [0, total_rows) with the expected file names.
    pub fn validate(&self) -> Result<(), CacheError> {
        if self.format != FORMAT {
            return Err(CacheError::Invalid(format!(
                "index format `{}`, expected `{FORMAT}`",
                self.format
            )));
        }
        if self.version != VERSION {
            return Err(CacheError::Invalid(format!(
                "index format version {}, this build reads version {VERSION}",
                self.version
            )));
        }
        self.metadata.validate()?;
        let mut next = 0u64;
        for (i, s) in self.shards.iter().enumerate() {
            if s.file != shard_file(i) {
                return Err(CacheError::Invalid(format!(
                    "index shard {i} is `{}`, expected `{}`",
                    s.file,
                    shard_file(i)
                )));
            }
            if s.start != next || s.end <= s.start {
                return Err(CacheError::Invalid(format!(
                    "index shard {} has rows [{}, {}), expected a non-empty range from {next}",
                    s.file, s.start, s.end
                )));
            }
            next = s.end;
        }
        if next != self.total_rows {
            return Err(CacheError::Invalid(format!(
                "index total_rows {} but the shards end at row {next}",
                self.total_rows
            )));
        }
        Ok(())
    }
}
