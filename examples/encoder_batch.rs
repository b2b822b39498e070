//! How batch size changes the embedded encoder's speed on equal-length inputs (no padding):
//! encoder_batch MODEL_DIR
fn main() {
    let dir = std::path::PathBuf::from(std::env::args().nth(1).expect("MODEL_DIR"));
    let spec = wattgate::models::find_encoder("all-minilm-l6-v2").expect("spec");
    let enc = wattgate::embeddings::encoder::Encoder::load(&dir, &spec).expect("load");
    for len in [16usize, 64, 256] {
        let input: Vec<u32> = (0..len).map(|i| 1000 + i as u32).collect();
        let batch: Vec<Vec<u32>> = vec![input.clone(); 32];
        enc.embed(&batch[..2]).expect("warm");
        let t = std::time::Instant::now();
        for one in &batch {
            enc.embed(std::slice::from_ref(one)).expect("one");
        }
        let singles = t.elapsed().as_secs_f64();
        for b in [4usize, 8, 32] {
            let t = std::time::Instant::now();
            for chunk in batch.chunks(b) {
                enc.embed(chunk).expect("batch");
            }
            let batched = t.elapsed().as_secs_f64();
            println!(
                "len {len:>3}: 32 singles {:.1} texts/s, batch {b:>2} {:.1} texts/s",
                32.0 / singles,
                32.0 / batched
            );
        }
    }
}
