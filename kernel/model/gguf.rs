//! GGUF (version 2 and 3) over a memory map: the metadata table, the tensor
//! table, and each tensor's bytes in place (quantized tensors are never
//! expanded at load). Layout as specified by ggml's `docs/gguf.md`:
//!
//! | part            | contents                                                        |
//! | --------------- | --------------------------------------------------------------- |
//! | header          | magic `GGUF`, u32 version, u64 tensor count, u64 metadata count |
//! | metadata        | (string key, u32 type, value) × count; arrays typed and counted |
//! | tensor infos    | (string name, u32 dims, u64 × dims, u32 ggml type, u64 offset)  |
//! | padding         | to `general.alignment` (default 32)                             |
//! | tensor data     | each tensor at its offset from here, aligned                    |
//!
//! Strings are u64 length + UTF-8 bytes; all integers little-endian. Dims are
//! listed innermost first (`[k, n]` for a weight of n rows of k values).

use std::{collections::BTreeMap, fs::File, path::Path};

use memmap2::Mmap;

use crate::{
    backend::quant::GgmlType,
    error::{Error, Result},
};

#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetaValue>),
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v.into()),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Innermost first, as stored.
    pub dims: Vec<usize>,
    pub dtype: GgmlType,
    /// From the start of the data section.
    pub offset: usize,
    pub bytes: usize,
}

impl TensorInfo {
    pub fn elements(&self) -> usize {
        self.dims.iter().product()
    }
}

pub struct GgufFile {
    path: String,
    map: Mmap,
    pub version: u32,
    pub metadata: BTreeMap<String, MetaValue>,
    pub tensors: BTreeMap<String, TensorInfo>,
    data_start: usize,
}

/// Bounds on what a header may claim, so a corrupt file fails cleanly instead
/// of asking for terabytes.
const MAX_COUNT: u64 = 1 << 24;
const MAX_DIMS: u32 = 8;

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    path: &'a str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&end| end <= self.bytes.len()).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: truncated GGUF header at byte {}", self.path, self.at))
        })?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn count(&mut self, what: &str) -> Result<u64> {
        let n = self.u64()?;
        if n > MAX_COUNT {
            return Err(Error::InvalidArgument(format!("{}: {what} count {n} is not plausible", self.path)));
        }
        Ok(n)
    }

    fn string(&mut self) -> Result<String> {
        let len = self.u64()?;
        let bytes = self.take(usize::try_from(len).unwrap_or(usize::MAX))?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| Error::InvalidArgument(format!("{}: a GGUF string is not UTF-8", self.path)))
    }

    fn value(&mut self, kind: u32, depth: usize) -> Result<MetaValue> {
        Ok(match kind {
            0 => MetaValue::U8(self.array::<1>()?[0]),
            1 => MetaValue::I8(self.array::<1>()?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array()?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array()?)),
            4 => MetaValue::U32(self.u32()?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array()?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array()?)),
            7 => MetaValue::Bool(self.array::<1>()?[0] != 0),
            8 => MetaValue::String(self.string()?),
            9 if depth == 0 => {
                let inner = self.u32()?;
                let n = self.count("array")?;
                (0..n).map(|_| self.value(inner, depth + 1)).collect::<Result<Vec<_>>>().map(MetaValue::Array)?
            }
            10 => MetaValue::U64(self.u64()?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array()?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array()?)),
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{}: metadata value type {other} is not part of GGUF",
                    self.path
                )));
            }
        })
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let shown = path.display().to_string();
        let file = File::open(path).map_err(|e| Error::NotFound(format!("{shown}: {e}")))?;
        // SAFETY: the map is read-only and the file is a model we do not
        // modify while serving; a file truncated underneath us would fault,
        // which is the documented cost of mapping model weights.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Internal(format!("{shown}: cannot map: {e}")))?;
        let mut cursor = Cursor { bytes: &map, at: 0, path: &shown };
        if cursor.take(4)? != b"GGUF" {
            return Err(Error::InvalidArgument(format!("{shown}: not a GGUF file (bad magic)")));
        }
        let version = cursor.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::InvalidArgument(format!(
                "{shown}: GGUF version {version}; aitl reads versions 2 and 3"
            )));
        }
        let tensor_count = cursor.count("tensor")?;
        let metadata_count = cursor.count("metadata")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..metadata_count {
            let key = cursor.string()?;
            let kind = cursor.u32()?;
            let value = cursor.value(kind, 0)?;
            metadata.insert(key, value);
        }
        let mut tensors = BTreeMap::new();
        for _ in 0..tensor_count {
            let name = cursor.string()?;
            let n_dims = cursor.u32()?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(Error::InvalidArgument(format!("{shown}: tensor {name:?} has {n_dims} dimensions")));
            }
            let dims = (0..n_dims)
                .map(|_| cursor.u64().map(|d| usize::try_from(d).unwrap_or(usize::MAX)))
                .collect::<Result<Vec<_>>>()?;
            let type_id = cursor.u32()?;
            let dtype = GgmlType::from_id(type_id).ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "{shown}: tensor {name:?} has ggml type {type_id}, which aitl does not read \
                     (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
                ))
            })?;
            let offset = usize::try_from(cursor.u64()?).unwrap_or(usize::MAX);
            let elements = dims.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
            let bytes =
                elements.filter(|e| e % dtype.block_values() == 0).map(|e| dtype.row_bytes(e)).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{shown}: tensor {name:?} {dims:?} is not a whole number of {:?} blocks",
                        dtype
                    ))
                })?;
            tensors.insert(name, TensorInfo { dims, dtype, offset, bytes });
        }
        let alignment = metadata.get("general.alignment").and_then(MetaValue::as_u64).unwrap_or(32) as usize;
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(Error::InvalidArgument(format!(
                "{shown}: general.alignment {alignment} is not a power of two"
            )));
        }
        let data_start = cursor.at.next_multiple_of(alignment);
        for (name, info) in &tensors {
            let end = data_start.checked_add(info.offset).and_then(|s| s.checked_add(info.bytes));
            if end.is_none_or(|end| end > map.len()) || info.offset % alignment != 0 {
                return Err(Error::InvalidArgument(format!(
                    "{shown}: tensor {name:?} lies outside the file or off its alignment (offset {})",
                    info.offset
                )));
            }
        }
        Ok(GgufFile { path: shown, map, version, metadata, tensors, data_start })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A required unsigned integer.
    pub fn meta_u64(&self, key: &str) -> Result<u64> {
        self.meta(key).and_then(MetaValue::as_u64).ok_or_else(|| self.missing(key))
    }

    pub fn meta_f64(&self, key: &str) -> Result<f64> {
        self.meta(key).and_then(MetaValue::as_f64).ok_or_else(|| self.missing(key))
    }

    pub fn meta_str(&self, key: &str) -> Result<&str> {
        self.meta(key).and_then(MetaValue::as_str).ok_or_else(|| self.missing(key))
    }

    fn missing(&self, key: &str) -> Error {
        Error::InvalidArgument(format!("{}: metadata {key:?} is missing or has the wrong type", self.path))
    }

    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::InvalidArgument(format!("{}: tensor {name:?} is missing", self.path)))
    }

    /// The tensor's stored bytes, in place in the map.
    pub fn bytes(&self, name: &str) -> Result<&[u8]> {
        let info = self.info(name)?;
        let start = self.data_start + info.offset;
        Ok(&self.map[start..start + info.bytes])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF file as llama.cpp's writer lays it out.
    struct Writer(Vec<u8>);

    impl Writer {
        fn string(&mut self, s: &str) {
            self.0.extend((s.len() as u64).to_le_bytes());
            self.0.extend(s.as_bytes());
        }
        fn key(&mut self, key: &str, kind: u32) {
            self.string(key);
            self.0.extend(kind.to_le_bytes());
        }
    }

    fn sample_file(corrupt: impl FnOnce(&mut Vec<u8>)) -> (tempfile::NamedTempFile, Vec<u8>) {
        let mut w = Writer(Vec::new());
        w.0.extend(b"GGUF");
        w.0.extend(3u32.to_le_bytes());
        w.0.extend(2u64.to_le_bytes()); // tensors
        w.0.extend(5u64.to_le_bytes()); // metadata
        w.key("general.architecture", 8);
        w.string("llama");
        w.key("llama.block_count", 4);
        w.0.extend(30u32.to_le_bytes());
        w.key("llama.rope.freq_base", 6);
        w.0.extend(100000f32.to_le_bytes());
        w.key("tokenizer.ggml.merges", 9);
        w.0.extend(8u32.to_le_bytes());
        w.0.extend(2u64.to_le_bytes());
        w.string("Ġ t");
        w.string("i n");
        w.key("tokenizer.ggml.add_bos_token", 7);
        w.0.push(0);
        // Tensors: a 4×2 f32 matrix at 0, one Q8_0 block at 32.
        w.string("norm");
        w.0.extend(2u32.to_le_bytes());
        w.0.extend(4u64.to_le_bytes());
        w.0.extend(2u64.to_le_bytes());
        w.0.extend(0u32.to_le_bytes());
        w.0.extend(0u64.to_le_bytes());
        w.string("q8");
        w.0.extend(1u32.to_le_bytes());
        w.0.extend(32u64.to_le_bytes());
        w.0.extend(8u32.to_le_bytes());
        w.0.extend(32u64.to_le_bytes());
        while !w.0.len().is_multiple_of(32) {
            w.0.push(0);
        }
        w.0.extend((0..8).flat_map(|i| (i as f32).to_le_bytes()));
        let mut q8 = crate::backend::half::f32_to_f16(0.5).to_le_bytes().to_vec();
        q8.extend((0..32).map(|i| i as u8));
        w.0.extend(&q8);
        corrupt(&mut w.0);
        let mut file = tempfile::NamedTempFile::new().unwrap();
        std::io::Write::write_all(&mut file, &w.0).unwrap();
        (file, q8)
    }

    #[test]
    fn reads_metadata_tensor_table_and_bytes_in_place() {
        let (file, q8) = sample_file(|_| {});
        let gguf = GgufFile::open(file.path()).unwrap();
        assert_eq!(gguf.version, 3);
        assert_eq!(gguf.meta_str("general.architecture").unwrap(), "llama");
        assert_eq!(gguf.meta_u64("llama.block_count").unwrap(), 30);
        assert_eq!(gguf.meta_f64("llama.rope.freq_base").unwrap(), 100000.0);
        assert_eq!(gguf.meta("tokenizer.ggml.add_bos_token"), Some(&MetaValue::Bool(false)));
        let merges = gguf.meta("tokenizer.ggml.merges").and_then(MetaValue::as_array).unwrap();
        assert_eq!(merges[1].as_str(), Some("i n"));
        let norm = gguf.info("norm").unwrap();
        assert_eq!((norm.dims.as_slice(), norm.dtype, norm.bytes), (&[4, 2][..], GgmlType::F32, 32));
        let values: Vec<f32> =
            gguf.bytes("norm").unwrap().chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(values, (0..8).map(|i| i as f32).collect::<Vec<_>>());
        assert_eq!(gguf.bytes("q8").unwrap(), q8.as_slice());
        assert!(gguf.meta_u64("llama.missing").unwrap_err().to_string().contains("llama.missing"));
    }

    #[test]
    fn refuses_corrupt_files_with_the_reason() {
        type Corruption = fn(&mut Vec<u8>);
        let cases: [(Corruption, &str); 4] = [
            (|b| b[0] = b'X', "bad magic"),
            (|b| b.truncate(60), "truncated"),
            // The Q8_0 tensor's type id becomes 99.
            (
                |b| {
                    let at = b.windows(2).rposition(|w| w == b"q8").unwrap() + 2 + 4 + 8;
                    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
                },
                "ggml type 99",
            ),
            (|b| b.truncate(b.len() - 10), "outside the file"),
        ];
        for (corrupt, reason) in cases {
            let (file, _) = sample_file(corrupt);
            let err = GgufFile::open(file.path()).err().expect("refused");
            assert!(err.to_string().contains(reason), "{err} should say {reason}");
        }
    }
}
