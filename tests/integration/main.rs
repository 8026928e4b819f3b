//! The integration tests, one module per area, built as one test binary: each binary links the whole
//! tensor stack, so one binary instead of thirty keeps a clean build small and quick to link.

mod common;

mod align;
mod assets;
mod attack_gcg;
mod chat;
mod crash_anywhere;
mod data_splits;
mod disk_full;
mod eval_frames;
mod eval_judges;
mod eval_metrics;
mod eval_run;
mod eval_user_suites;
mod explain_smollm2;
mod export;
mod features_smollm2;
mod fuzz_corpus;
mod fuzz_regressions;
mod gate;
mod gguf;
mod jailbreak_templates;
mod lora;
mod lora_init;
mod missing_assets;
mod model_errors;
mod model_golden;
mod model_sources;
mod report_chromium;
mod run_lock;
mod sae_corpus;
mod sae_formats;
mod sae_golden;
mod sae_store;
mod sae_train;
mod serve;
mod sft_data;
mod smollm2;
mod theory;
mod tokenizer;
mod train_dpo;
mod train_dpo_golden;
mod train_golden;
mod train_resume;
mod train_smollm2;
