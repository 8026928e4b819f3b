//! The default SAE corpus is drawn from the training side of the evaluation splits only.

use candle_core::{DType, Device};
use sails::data::{normalise, Splits, Suite};
use sails::model::load::{ChatModel, ModelSource};
use sails::sae::corpus::{default_corpus, CorpusConfig};

#[test]
fn default_corpus_holds_no_evaluation_prompt() {
    let source = ModelSource::resolve("default").unwrap();
    let model = ChatModel::load(&source, &Device::Cpu, DType::F32).unwrap();
    let cfg = CorpusConfig {
        generated: 0,
        ..Default::default()
    };
    let corpus = default_corpus(&model, &cfg).unwrap();
    let splits = Splits::load().unwrap();
    let count = |name: &str| {
        corpus
            .sources
            .iter()
            .find(|(s, _)| s.starts_with(name))
            .map(|(_, n)| *n)
    };
    assert_eq!(count("advbench"), Some(splits.train_harmful().len()));
    assert!(
        splits.train_harmful().len() < 520,
        "AdvBench's held-out part is left out"
    );
    assert_eq!(
        count("alpaca"),
        Some(splits.alpaca_train().len().min(cfg.alpaca_max))
    );

    // Every conversation as normalised text, searched for every evaluation prompt.
    let text: String = corpus
        .train
        .iter()
        .chain(&corpus.heldout)
        .map(|s| normalise(&model.tokenizer.decode(&s.ids, true).unwrap()))
        .collect::<Vec<_>>()
        .join(" | ");
    let mut checked = 0;
    for suite in [Suite::Harmful, Suite::Overrefusal, Suite::XstestUnsafe] {
        for item in splits.eval_suite(suite) {
            let prompt = normalise(&item.text);
            // Very short prompts could match inside unrelated text by chance.
            if prompt.len() >= 40 {
                assert!(
                    !text.contains(&prompt),
                    "{}: {:?} is in the SAE corpus",
                    item.id,
                    item.text
                );
                checked += 1;
            }
        }
    }
    for pair in splits.alpaca_eval() {
        let prompt = normalise(&pair.prompt);
        if prompt.len() >= 40 {
            assert!(!text.contains(&prompt), "{} is in the SAE corpus", pair.id);
            checked += 1;
        }
    }
    assert!(
        checked > 600,
        "only {checked} evaluation prompts were long enough to check"
    );
}
