//! Reading a cache: the index checked against the shards' headers, then any
//! row range read across shards.

use super::format::{self, CacheMeta, Index, ValuesDtype};
use super::{io_err, CacheError, TopkRows};
use safetensors::tensor::Metadata;
use safetensors::{Dtype, SafeTensors};
use std::io::Read;
use std::path::{Path, PathBuf};

/// An open cache: its index, checked against every listed shard's header.
#[derive(Debug, Clone)]
pub struct CacheReader {
    dir: PathBuf,
    index: Index,
}

impl CacheReader {
    /// Opens the cache in `dir`: reads the index, checks it (format,
    /// version, metadata, shards tiling the rows) and checks each listed
    /// shard's header (same metadata, its row range, tensor dtypes and
    /// shapes, the file's length). Files the index does not list (a
    /// temporary file of a killed writer, a shard written just before a
    /// crash and never indexed) are not part of the cache.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let path = dir.join(format::INDEX_FILE);
        let text = std::fs::read(&path).map_err(|e| {
            io_err(
                &path,
                "cannot read the teacher cache's index (is this a cache directory?)",
                e,
            )
        })?;
        let index: Index = serde_json::from_slice(&text).map_err(|e| {
            CacheError::Invalid(format!("{}: not a valid index: {e}", path.display()))
        })?;
        index
            .validate()
            .map_err(|e| CacheError::Invalid(format!("{}: {e}", path.display())))?;
        let r = CacheReader {
            dir: dir.to_path_buf(),
            index,
        };
        for i in 0..r.index.shards.len() {
            r.check_shard(i)?;
        }
        Ok(r)
    }

    /// The metadata.
    pub fn meta(&self) -> &CacheMeta {
        &self.index.metadata
    }

    /// The index.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Rows in the cache.
    pub fn rows(&self) -> u64 {
        self.index.total_rows
    }

    /// Checks shard `i`'s header against the index without reading its data.
    fn check_shard(&self, i: usize) -> Result<(), CacheError> {
        let entry = &self.index.shards[i];
        let path = self.dir.join(&entry.file);
        let bad = |m: String| CacheError::Invalid(format!("{}: {m}", path.display()));
        let mut f = std::fs::File::open(&path)
            .map_err(|e| io_err(&path, "a shard the index lists cannot be opened", e))?;
        let len = f
            .metadata()
            .map_err(|e| io_err(&path, "cannot stat", e))?
            .len();
        let mut n = [0u8; 8];
        f.read_exact(&mut n)
            .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let n = u64::from_le_bytes(n);
        if n > len.saturating_sub(8) || n > 100_000_000 {
            return Err(bad(format!(
                "header length {n} exceeds the file ({len} bytes)"
            )));
        }
        let mut header = vec![0u8; n as usize];
        f.read_exact(&mut header)
            .map_err(|e| bad(format!("cannot read the header: {e}")))?;
        let meta: Metadata = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("not a safetensors header: {e}")))?;
        if 8 + n + meta.data_len() as u64 != len {
            return Err(bad(format!(
                "{len} bytes, the header describes {} (a truncated or altered shard)",
                8 + n + meta.data_len() as u64
            )));
        }
        let kv = meta
            .metadata()
            .as_ref()
            .ok_or_else(|| bad("no __metadata__".into()))?;
        let shard_meta = CacheMeta::from_header(kv).map_err(|e| bad(e.to_string()))?;
        if let Some(m) = self.index.metadata.mismatch(&shard_meta) {
            return Err(bad(format!("metadata differs from the index ({m})")));
        }
        let rows = (entry.end - entry.start) as usize;
        let field = |key: &str| kv.get(key).and_then(|v| v.parse::<u64>().ok());
        if field("rows") != Some(rows as u64) || field("row_start") != Some(entry.start) {
            return Err(bad(format!(
                "holds rows {:?} from {:?}, the index says [{}, {})",
                kv.get("rows"),
                kv.get("row_start"),
                entry.start,
                entry.end
            )));
        }
        let k = self.index.metadata.k;
        let mut want = vec![
            (format::INDICES, Dtype::I32, vec![rows, k]),
            (
                format::VALUES,
                self.index.metadata.values_dtype.safetensors(),
                vec![rows, k],
            ),
        ];
        if self.index.metadata.with_lse {
            want.push((format::LSE, Dtype::F32, vec![rows]));
        }
        if meta.tensors().len() != want.len() {
            return Err(bad(format!(
                "{} tensors, expected {}",
                meta.tensors().len(),
                want.len()
            )));
        }
        for (name, dtype, shape) in want {
            match meta.info(name) {
                Some(t) if t.dtype == dtype && t.shape == shape => {}
                Some(t) => {
                    return Err(bad(format!(
                        "tensor `{name}` is {} {:?}, expected {dtype} {shape:?}",
                        t.dtype, t.shape
                    )))
                }
                None => return Err(bad(format!("no tensor `{name}`"))),
            }
        }
        Ok(())
    }

    /// Rows [start, end) of the cache, across shards.
    pub fn read_rows(&self, start: u64, end: u64) -> Result<TopkRows, CacheError> {
        if start > end || end > self.rows() {
            return Err(CacheError::Invalid(format!(
                "rows {start}:{end} are not within the cache's 0:{}",
                self.rows()
            )));
        }
        let meta = &self.index.metadata;
        let k = meta.k;
        let rows = (end - start) as usize;
        let mut out = TopkRows {
            rows,
            k,
            indices: Vec::with_capacity(rows * k),
            values: Vec::with_capacity(rows * k),
            lse: meta.with_lse.then(|| Vec::with_capacity(rows)),
        };
        for s in &self.index.shards {
            let (lo, hi) = (start.max(s.start), end.min(s.end));
            if lo >= hi {
                continue;
            }
            let path = self.dir.join(&s.file);
            let buf = std::fs::read(&path).map_err(|e| io_err(&path, "cannot read", e))?;
            let st = SafeTensors::deserialize(&buf).map_err(|e| {
                CacheError::Invalid(format!("{}: not a valid shard: {e}", path.display()))
            })?;
            let (a, b) = ((lo - s.start) as usize, (hi - s.start) as usize);
            let tensor = |name: &str| {
                st.tensor(name).map_err(|e| {
                    CacheError::Invalid(format!("{}: tensor `{name}`: {e}", path.display()))
                })
            };
            // The shard was checked at open; a file changed since is an error, not a panic.
            let part = |name: &str, width: usize| -> Result<&[u8], CacheError> {
                let t = tensor(name)?;
                let per_row = if name == format::LSE {
                    width
                } else {
                    k * width
                };
                t.data().get(a * per_row..b * per_row).ok_or_else(|| {
                    CacheError::Invalid(format!(
                        "{}: tensor `{name}` changed since the cache was opened",
                        path.display()
                    ))
                })
            };
            out.indices.extend(
                part(format::INDICES, 4)?
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            match meta.values_dtype {
                ValuesDtype::F32 => out.values.extend(
                    part(format::VALUES, 4)?
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                ),
                ValuesDtype::Bf16 => out.values.extend(
                    part(format::VALUES, 2)?
                        .chunks_exact(2)
                        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()),
                ),
            }
            if let Some(l) = out.lse.as_mut() {
                l.extend(
                    part(format::LSE, 4)?
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                );
            }
        }
        Ok(out)
    }
}
