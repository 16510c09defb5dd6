//! Shared by the models' integration tests.

use candle_core::quantized::gguf_file::Content;
use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use models::llama::Llama;

/// Our Llama forward pass and candle-transformers' on the same GGUF bytes,
/// on the CPU: the prompt, then `steps` single tokens, each the greedy pick
/// of our logits (or `next(step)` when given). `check(step, ours, theirs)`
/// sees each step's two logit vectors; step 0 is the prompt.
pub fn llama_side_by_side(
    gguf: &[u8],
    prompt: &[u32],
    steps: usize,
    next: Option<&dyn Fn(usize) -> u32>,
    mut check: impl FnMut(usize, &[f32], &[f32]),
) {
    let load = || {
        let mut cursor = std::io::Cursor::new(gguf);
        let content = Content::read(&mut cursor).expect("GGUF header");
        (content, cursor)
    };
    let cpu = Device::Cpu;
    let (content, mut cursor) = load();
    let mut theirs = ModelWeights::from_gguf(content, &mut cursor, &cpu).expect("theirs");
    let (content, mut cursor) = load();
    let mut ours = Llama::from_gguf(content, &mut cursor, &cpu).expect("ours");
    ours.start(prompt.len() + steps).expect("start");
    let mut input = prompt.to_vec();
    let mut position = 0;
    for step in 0..=steps {
        let x = Tensor::new(input.as_slice(), &cpu)
            .and_then(|t| t.unsqueeze(0))
            .expect("ids");
        let logits = |l: candle_core::Result<Tensor>| -> Vec<f32> {
            l.and_then(|t| t.flatten_all()?.to_vec1()).expect("logits")
        };
        let (a, b) = (
            logits(ours.forward(&x, position)),
            logits(theirs.forward(&x, position)),
        );
        assert_eq!(a.len(), b.len());
        check(step, &a, &b);
        position += input.len();
        let greedy = a
            .iter()
            .enumerate()
            .fold((0, f32::MIN), |m, (i, &v)| if v > m.1 { (i, v) } else { m })
            .0 as u32;
        input = vec![next.map_or(greedy, |f| f(step))];
    }
}

/// The largest and the mean absolute difference of two vectors.
pub fn differences(a: &[f32], b: &[f32]) -> (f32, f32) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let mean = a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / a.len() as f32;
    (worst, mean)
}
