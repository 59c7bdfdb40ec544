//! Fused linear + distillation loss (src/fused_linear): the chunked loss and
//! gradients against the same loss on explicitly materialised logits, over
//! random shapes, chunkings, teachers and options, on the oracle, the CPU
//! backend and the emulated kernels; finite differences of the oracle's
//! loss; the errors.

mod case;
mod finite_diff;
mod materialised;
mod validation;
