//! The kernel sources (`kernels-cu/`, one family per file) and the closed
//! set of entry points the backend launches. Sources are embedded in the
//! binary, so a deployed server needs only the driver, NVRTC and cuBLAS.

/// Helpers every family includes; spliced in place of `#include "common.cuh"`
/// because NVRTC sees no files.
const COMMON: &str = include_str!("../../../kernels-cu/common.cuh");
const INCLUDE_COMMON: &str = "#include \"common.cuh\"";

/// One `.cu` file: compiled as one module.
#[derive(Debug)]
pub struct KernelFamily {
    pub name: &'static str,
    source: &'static str,
}

impl KernelFamily {
    /// A family outside the built-in set (tools and tests).
    pub const fn new(name: &'static str, source: &'static str) -> Self {
        KernelFamily { name, source }
    }

    /// The source NVRTC compiles: the file with `common.cuh` spliced in.
    pub fn source(&self) -> String {
        self.source.replacen(INCLUDE_COMMON, COMMON, 1)
    }
}

macro_rules! families {
    ($($id:ident => $file:literal),* $(,)?) => {
        /// The families, by file.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Family { $($id),* }

        pub const FAMILIES: &[KernelFamily] = &[
            $(KernelFamily { name: $file, source: include_str!(concat!("../../../kernels-cu/", $file)) }),*
        ];

        impl Family {
            pub fn get(self) -> &'static KernelFamily {
                &FAMILIES[self as usize]
            }
        }
    };
}

families! {
    Embeddings => "embeddings.cu",
    LayerNorm => "layer_norm.cu",
    Attention => "attention.cu",
    Pooling => "pooling.cu",
    Elementwise => "elementwise.cu",
    VectorSearch => "vector_search.cu",
    Layout => "layout.cu",
    QuantMatvec => "quant_matvec.cu",
    Decoder => "decoder.cu",
    Moe => "moe.cu",
    Dequantize => "dequantize.cu",
    Sampling => "sampling.cu",
}

macro_rules! kernels {
    ($($id:ident => ($family:ident, $entry:literal)),* $(,)?) => {
        /// Every entry point the backend launches.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum KernelId { $($id),* }

        impl KernelId {
            pub const ALL: &[KernelId] = &[$(KernelId::$id),*];

            pub fn family(self) -> Family {
                match self { $(KernelId::$id => Family::$family),* }
            }

            /// The `extern "C"` name in the family's source.
            pub fn entry(self) -> &'static str {
                match self { $(KernelId::$id => $entry),* }
            }
        }
    };
}

kernels! {
    EmbedLayerNorm => (Embeddings, "embed_layer_norm_f32"),
    GatherRows => (Embeddings, "gather_rows_f32"),
    AddLayerNorm => (LayerNorm, "add_layer_norm_f32"),
    RmsNorm => (LayerNorm, "rms_norm_f32"),
    AddRmsNorm => (LayerNorm, "add_rms_norm_f32"),
    AttentionD16 => (Attention, "varlen_attention_f32_d16"),
    AttentionD32 => (Attention, "varlen_attention_f32_d32"),
    AttentionD64 => (Attention, "varlen_attention_f32_d64"),
    AttentionD128 => (Attention, "varlen_attention_f32_d128"),
    MeanPool => (Pooling, "mean_pool_f32"),
    L2Normalize => (Pooling, "l2_normalize_f32"),
    BiasAct => (Elementwise, "bias_act_f32"),
    Add => (Elementwise, "add_f32"),
    F32ToBf16 => (Elementwise, "f32_to_bf16"),
    Bf16ToF32 => (Elementwise, "bf16_to_f32"),
    F32ToF16 => (Elementwise, "f32_to_f16"),
    F16ToF32 => (Elementwise, "f16_to_f32"),
    ScoreRowsF32 => (VectorSearch, "score_rows_f32"),
    ScoreRowsF16 => (VectorSearch, "score_rows_f16"),
    ScoreRowsBf16 => (VectorSearch, "score_rows_bf16"),
    TopkChunks => (VectorSearch, "topk_chunks_f32"),
    CopyColumns => (Layout, "copy_columns_f32"),
    QuantizeQ8_1 => (QuantMatvec, "quantize_q8_1_f32"),
    QuantizeQ8K => (QuantMatvec, "quantize_q8_k_f32"),
    MatvecF32 => (QuantMatvec, "matvec_f32"),
    MatvecF16 => (QuantMatvec, "matvec_f16"),
    MatvecBf16 => (QuantMatvec, "matvec_bf16"),
    MatvecQ4_0 => (QuantMatvec, "matvec_q4_0"),
    MatvecQ4_1 => (QuantMatvec, "matvec_q4_1"),
    MatvecQ8_0 => (QuantMatvec, "matvec_q8_0"),
    MatvecQ4K => (QuantMatvec, "matvec_q4_k"),
    MatvecQ5K => (QuantMatvec, "matvec_q5_k"),
    MatvecQ6K => (QuantMatvec, "matvec_q6_k"),
    Rope => (Decoder, "rope_f32"),
    SiluMul => (Decoder, "silu_mul_f32"),
    KvAppendF16 => (Decoder, "kv_append_f16"),
    KvAppendBf16 => (Decoder, "kv_append_bf16"),
    PagedAttentionD16 => (Decoder, "paged_attention_f32_d16"),
    PagedAttentionD32 => (Decoder, "paged_attention_f32_d32"),
    PagedAttentionD64 => (Decoder, "paged_attention_f32_d64"),
    PagedAttentionD128 => (Decoder, "paged_attention_f32_d128"),
    PagedAttentionCombine => (Decoder, "paged_attention_combine_f32"),
    MoeRoute => (Moe, "moe_route_f32"),
    MoePlan => (Moe, "moe_plan_f32"),
    MoeCombine => (Moe, "moe_combine_f32"),
    AddGated => (Moe, "add_gated_f32"),
    DequantizeF32 => (Dequantize, "dequantize_f32"),
    DequantizeF16 => (Dequantize, "dequantize_f16"),
    DequantizeBf16 => (Dequantize, "dequantize_bf16"),
    DequantizeQ4_0 => (Dequantize, "dequantize_q4_0"),
    DequantizeQ4_1 => (Dequantize, "dequantize_q4_1"),
    DequantizeQ8_0 => (Dequantize, "dequantize_q8_0"),
    DequantizeQ4K => (Dequantize, "dequantize_q4_k"),
    DequantizeQ5K => (Dequantize, "dequantize_q5_k"),
    DequantizeQ6K => (Dequantize, "dequantize_q6_k"),
    SampleTokens => (Sampling, "sample_tokens_f32"),
}

impl KernelId {
    /// The attention kernel for heads of `head_dim`, if there is one.
    pub fn attention(head_dim: usize) -> Option<KernelId> {
        match head_dim {
            16 => Some(KernelId::AttentionD16),
            32 => Some(KernelId::AttentionD32),
            64 => Some(KernelId::AttentionD64),
            128 => Some(KernelId::AttentionD128),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_entry_point_is_defined_in_its_family() {
        for &id in KernelId::ALL {
            let source = id.family().get().source();
            // Written out, or as the first argument of a macro that defines it.
            let (defined, by_macro) = (format!("{}(", id.entry()), format!("({},", id.entry()));
            assert!(
                source.contains(&defined) || source.contains(&by_macro),
                "{} does not define {}",
                id.family().get().name,
                id.entry()
            );
        }
    }

    #[test]
    fn sources_have_common_spliced_in_and_no_includes_left() {
        for family in FAMILIES {
            let source = family.source();
            let includes = source.lines().any(|line| line.trim_start().starts_with("#include"));
            assert!(!includes, "{} still includes a file", family.name);
            assert!(source.contains("typedef unsigned int u32"), "{} lacks common.cuh", family.name);
        }
    }
}
