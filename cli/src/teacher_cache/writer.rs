//! Writing a cache: rows buffered into whole shards, each shard and then the
//! index published by an atomic rename.

use super::format::{self, CacheMeta, Index, ShardEntry, ValuesDtype};
use super::{io_err, CacheError, CacheReader};
use safetensors::tensor::TensorView;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Test hook: when set to a shard number, the writer stops in the middle of
/// that shard's temporary file (half written, synced) and sleeps, so that a
/// test can kill it there.
#[doc(hidden)]
pub const STALL_ENV: &str = "KDFUSE_TEACHER_CACHE_STALL_AT_SHARD";

/// Appends rows to a cache directory, one finished shard at a time. One
/// writer per directory at a time.
#[derive(Debug)]
pub struct CacheWriter {
    dir: PathBuf,
    index: Index,
    shard_rows: usize,
    /// The rows not yet in a shard.
    indices: Vec<i32>,
    values: Vec<f32>,
    lse: Vec<f32>,
    rows: usize,
    stall_at: Option<usize>,
}

impl CacheWriter {
    /// Starts a new cache in `dir` (created if missing) whose shards hold
    /// `shard_rows` rows (the last one fewer); writes its empty index at
    /// once. A directory that already holds a cache is an error.
    pub fn create(dir: &Path, meta: CacheMeta, shard_rows: usize) -> Result<Self, CacheError> {
        meta.validate()?;
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, "cannot create the directory", e))?;
        if dir.join(format::INDEX_FILE).exists() {
            return Err(CacheError::Invalid(format!(
                "{}: already holds a teacher cache ({}): append to it, or give another directory",
                dir.display(),
                format::INDEX_FILE
            )));
        }
        let w = Self::new(dir, Index::new(meta), shard_rows)?;
        w.write_index()?;
        Ok(w)
    }

    /// Opens the cache in `dir` to add rows after its last one. `meta` must
    /// equal the cache's (an error names the first field that differs).
    pub fn append(dir: &Path, meta: CacheMeta, shard_rows: usize) -> Result<Self, CacheError> {
        meta.validate()?;
        let reader = CacheReader::open(dir)?;
        if let Some(m) = reader.meta().mismatch(&meta) {
            return Err(CacheError::Invalid(format!(
                "{}: the cache's metadata differs from the rows to append (the cache's {m})",
                dir.display()
            )));
        }
        Self::new(dir, reader.index().clone(), shard_rows)
    }

    fn new(dir: &Path, index: Index, shard_rows: usize) -> Result<Self, CacheError> {
        if shard_rows == 0 {
            return Err(CacheError::Invalid("shard rows must be ≥ 1".into()));
        }
        remove_stale_temporaries(dir)?;
        let stall_at = std::env::var(STALL_ENV).ok().and_then(|v| v.parse().ok());
        Ok(CacheWriter {
            dir: dir.to_path_buf(),
            index,
            shard_rows,
            indices: Vec::new(),
            values: Vec::new(),
            lse: Vec::new(),
            rows: 0,
            stall_at,
        })
    }

    /// The index as last published.
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// Adds `rows` rows (`indices` and `values` `[rows, k]`, `lse` `[rows]`
    /// exactly when the cache holds it); each shard that fills up is
    /// written.
    pub fn push(
        &mut self,
        rows: usize,
        indices: &[i32],
        values: &[f32],
        lse: Option<&[f32]>,
    ) -> Result<(), CacheError> {
        let meta = &self.index.metadata;
        let k = meta.k;
        let n = rows.checked_mul(k);
        if n != Some(indices.len()) || n != Some(values.len()) {
            return Err(CacheError::Invalid(format!(
                "{rows} rows of k = {k} need {} indices and values, got {} and {}",
                rows.saturating_mul(k),
                indices.len(),
                values.len()
            )));
        }
        match (meta.with_lse, lse) {
            (true, Some(l)) if l.len() == rows => self.lse.extend_from_slice(l),
            (false, None) => {}
            (true, _) => {
                return Err(CacheError::Invalid(format!(
                    "the cache holds lse: {rows} values are needed"
                )))
            }
            (false, Some(_)) => {
                return Err(CacheError::Invalid(
                    "the cache holds no lse, yet lse was given".into(),
                ))
            }
        }
        let v = meta.vocab_size;
        if let Some(p) = indices.iter().position(|&i| i < 0 || i as usize >= v) {
            return Err(CacheError::Invalid(format!(
                "row {}: index {} is outside [0, V = {v})",
                p / k,
                indices[p]
            )));
        }
        self.indices.extend_from_slice(indices);
        self.values.extend_from_slice(values);
        self.rows += rows;
        while self.rows >= self.shard_rows {
            self.write_shard(self.shard_rows)?;
        }
        Ok(())
    }

    /// Writes the rows still buffered as a last, shorter shard; the
    /// published index.
    pub fn finish(mut self) -> Result<Index, CacheError> {
        if self.rows > 0 {
            self.write_shard(self.rows)?;
        }
        Ok(self.index)
    }

    /// Writes the first `rows` buffered rows as the next shard, then the
    /// index that lists it.
    fn write_shard(&mut self, rows: usize) -> Result<(), CacheError> {
        let meta = self.index.metadata.clone();
        let k = meta.k;
        let i = self.index.shards.len();
        let name = format::shard_file(i);
        let start = self.index.total_rows;
        let end = start + rows as u64;

        let idx: Vec<u8> = self.indices[..rows * k]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let vals: Vec<u8> = match meta.values_dtype {
            ValuesDtype::F32 => self.values[..rows * k]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect(),
            ValuesDtype::Bf16 => self.values[..rows * k]
                .iter()
                .flat_map(|&x| half::bf16::from_f32(x).to_le_bytes())
                .collect(),
        };
        let lse: Vec<u8> = if meta.with_lse {
            self.lse[..rows]
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect()
        } else {
            Vec::new()
        };
        let mut tensors = vec![
            (
                format::INDICES,
                view(safetensors::Dtype::I32, vec![rows, k], &idx)?,
            ),
            (
                format::VALUES,
                view(meta.values_dtype.safetensors(), vec![rows, k], &vals)?,
            ),
        ];
        if meta.with_lse {
            tensors.push((
                format::LSE,
                view(safetensors::Dtype::F32, vec![rows], &lse)?,
            ));
        }
        let mut header = meta.to_header();
        header.insert("rows".into(), rows.to_string());
        header.insert("row_start".into(), start.to_string());
        let bytes = safetensors::serialize(tensors, Some(header))
            .map_err(|e| CacheError::Invalid(format!("{name}: {e}")))?;
        write_atomic(&self.dir, &name, &bytes, self.stall_at == Some(i))?;

        self.index.shards.push(ShardEntry {
            file: name,
            start,
            end,
        });
        self.index.total_rows = end;
        self.write_index()?;
        self.indices.drain(..rows * k);
        self.values.drain(..rows * k);
        if meta.with_lse {
            self.lse.drain(..rows);
        }
        self.rows -= rows;
        Ok(())
    }

    fn write_index(&self) -> Result<(), CacheError> {
        let mut json = serde_json::to_vec_pretty(&self.index)
            .map_err(|e| CacheError::Invalid(format!("{}: {e}", format::INDEX_FILE)))?;
        json.push(b'\n');
        write_atomic(&self.dir, format::INDEX_FILE, &json, false)
    }
}

fn view<'a>(
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
) -> Result<TensorView<'a>, CacheError> {
    TensorView::new(dtype, shape, data).map_err(|e| CacheError::Invalid(e.to_string()))
}

/// Whether `name` is one of this writer's temporary files.
pub(super) fn is_temporary(name: &str) -> bool {
    name.starts_with('.') && name.ends_with(".tmp")
}

/// Removes the temporary files a killed writer left behind.
fn remove_stale_temporaries(dir: &Path) -> Result<(), CacheError> {
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, "cannot list", e))?;
    for e in entries.flatten() {
        let name = e.file_name();
        if is_temporary(&name.to_string_lossy()) {
            let p = e.path();
            std::fs::remove_file(&p).map_err(|e| io_err(&p, "cannot remove", e))?;
        }
    }
    Ok(())
}

/// Writes `bytes` to `dir/name` so that the name only ever shows a complete
/// file: a temporary file in `dir`, synced, renamed, and the directory synced
/// (the rename itself made durable).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8], stall: bool) -> Result<(), CacheError> {
    let path = dir.join(name);
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // The mode File::create gives (0666 less the umask), not tempfile's 0600.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let tmp = builder
        .tempfile_in(dir)
        .map_err(|e| io_err(&path, "cannot create a temporary file", e))?;
    let werr = |e: std::io::Error| io_err(&path, "writing", e);
    let mut f = tmp.as_file();
    if stall {
        let half = bytes.len() / 2;
        f.write_all(&bytes[..half]).map_err(werr)?;
        f.sync_all().map_err(werr)?;
        eprintln!("kdfuse: {STALL_ENV}: stalled in {}", path.display());
        loop {
            std::thread::sleep(std::time::Duration::from_secs(60));
        }
    }
    f.write_all(bytes).map_err(werr)?;
    f.sync_all().map_err(werr)?;
    tmp.persist(&path)
        .map_err(|e| io_err(&path, "cannot rename into place", e.error))?;
    #[cfg(unix)]
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_err(dir, "cannot sync the directory", e))?;
    Ok(())
}
