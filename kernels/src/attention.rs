//! Causal attention of a batch of sequences over their own keys and values, in a fixed order of
//! arithmetic.
//!
//! Why not candle's matmul and softmax: a general matrix product picks its blocking by shape, so
//! the same query row rounds differently when it comes with 1, 3 or 500 others. The rounding is
//! tiny (about 1e-6), but through a model's layers it moves logits by tenths, and a greedy token
//! with a near-tie changes. Here each (query row, head) is computed by one loop whose order
//! depends only on that row's position: a sequence gets bit-identical results alone or batched,
//! and a prompt resumed from a cached prefix gets exactly what a prompt computed whole gets.
//! Keys and values live in plain growing buffers, appended in place rather than concatenated
//! into new tensors at every step.

use std::ops::Range;

/// Lanes of the partial sums: wide enough for the compiler to vectorise (AVX2: 8 f32) while
/// the order of additions stays fixed.
const LANES: usize = 8;
/// A sliding-window cache drops the positions it no longer needs once this many have piled up,
/// so the move is paid once per this many steps.
pub const SLACK: usize = 64;

/// The keys and values of one layer of one sequence: rows of `width` (= kv heads x head dim)
/// values, for the positions `first..first + rows`.
#[derive(Debug, Clone, Default)]
pub struct KvRows {
    width: usize,
    first: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvRows {
    /// An empty cache for rows of `width` values.
    pub fn new(width: usize) -> Self {
        Self {
            width,
            ..Self::default()
        }
    }

    /// Rows held.
    pub fn rows(&self) -> usize {
        self.k.len().checked_div(self.width).unwrap_or(0)
    }

    /// Absolute position of the first row held.
    pub fn first(&self) -> usize {
        self.first
    }

    /// One past the last position held.
    pub fn end(&self) -> usize {
        self.first + self.rows()
    }

    /// Bytes of the buffers in use.
    pub fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * std::mem::size_of::<f32>()
    }

    /// Appends rows at the end (positions `end()..`).
    pub fn append(&mut self, k: &[f32], v: &[f32]) -> Result<(), String> {
        if k.len() != v.len() || self.width == 0 || !k.len().is_multiple_of(self.width) {
            return Err(format!(
                "{} keys and {} values are not whole rows of {}",
                k.len(),
                v.len(),
                self.width
            ));
        }
        self.k.extend_from_slice(k);
        self.v.extend_from_slice(v);
        Ok(())
    }

    /// Forgets the positions before `keep_from` once at least [`SLACK`] of them are dead.
    pub fn forget_before(&mut self, keep_from: usize) {
        let dead = keep_from.saturating_sub(self.first).min(self.rows());
        if dead >= SLACK {
            self.k.drain(..dead * self.width);
            self.v.drain(..dead * self.width);
            self.first += dead;
        }
    }

    /// The cache as it was when it ended at `end`, holding positions from `keep_from` on; `None`
    /// when those positions are no longer (or not yet) held.
    pub fn truncated(&self, keep_from: usize, end: usize) -> Option<KvRows> {
        if keep_from < self.first || end > self.end() || keep_from > end {
            return None;
        }
        let rows = (keep_from - self.first) * self.width..(end - self.first) * self.width;
        Some(KvRows {
            width: self.width,
            first: keep_from,
            k: self.k[rows.clone()].to_vec(),
            v: self.v[rows].to_vec(),
        })
    }

    fn key(&self, pos: usize, head: usize, dim: usize) -> &[f32] {
        let at = (pos - self.first) * self.width + head * dim;
        &self.k[at..at + dim]
    }

    fn value(&self, pos: usize, head: usize, dim: usize) -> &[f32] {
        let at = (pos - self.first) * self.width + head * dim;
        &self.v[at..at + dim]
    }
}

/// The attention a layer computes.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (each serves `heads / kv_heads` query heads).
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// A query at position p sees keys p - window < k <= p; `None` sees every earlier one.
    pub window: Option<usize>,
    /// Multiplies the scores before the softmax.
    pub scale: f32,
}

/// One sequence's new rows: `n` queries at positions `pos..pos + n`, whose keys and values are
/// already appended to `cache`.
pub struct Queries<'a> {
    /// The sequence's cache for this layer.
    pub cache: &'a KvRows,
    /// Position of the first query.
    pub pos: usize,
    /// `n x heads x head_dim` query values.
    pub q: &'a [f32],
    /// `n x heads x head_dim` outputs, written here.
    pub out: &'a mut [f32],
}

/// Computes every sequence's attention outputs, the (row, head) pairs spread over candle's CPU
/// thread pool. Fails, computing nothing, when a sequence's shapes or cache do not fit.
pub fn attend(g: &Geometry, batch: &mut [Queries<'_>]) -> Result<(), String> {
    let Geometry {
        heads,
        kv_heads,
        head_dim: d,
        ..
    } = *g;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || d == 0 {
        return Err(format!("{heads} heads over {kv_heads} kv heads of {d}"));
    }
    let row = heads * d;
    // Task t of sequence s is (row t / heads, head t % heads); `starts[s]` is s's first task.
    let mut starts = Vec::with_capacity(batch.len() + 1);
    let mut tasks = 0;
    for s in batch.iter() {
        if s.q.len() != s.out.len() || !s.q.len().is_multiple_of(row) {
            return Err(format!(
                "{} queries and {} outputs are not whole rows of {row}",
                s.q.len(),
                s.out.len()
            ));
        }
        let n = s.q.len() / row;
        let lowest = lowest_key(g, s.pos);
        if s.cache.width != kv_heads * d || lowest < s.cache.first || s.pos + n > s.cache.end() {
            return Err(format!(
                "the cache holds positions {}..{} of width {}, the queries need {lowest}..{} of width {}",
                s.cache.first,
                s.cache.end(),
                s.cache.width,
                s.pos + n,
                kv_heads * d
            ));
        }
        starts.push(tasks);
        tasks += n * heads;
    }
    starts.push(tasks);
    let seqs: Vec<(&KvRows, usize, &[f32], OutPtr)> = batch
        .iter_mut()
        .map(|s| (s.cache, s.pos, s.q, OutPtr(s.out.as_mut_ptr())))
        .collect();
    let work = |range: Range<usize>| {
        let mut scores = Vec::new();
        for t in range {
            let s = starts.partition_point(|&start| start <= t) - 1;
            let local = t - starts[s];
            let (i, h) = (local / heads, local % heads);
            let (cache, pos, q, out) = seqs[s];
            let at = (i * heads + h) * d;
            // SAFETY: task (s, i, h) alone writes out[at..at + d] of sequence s, inside its
            // `out` (checked above: out.len() == q.len()), which nothing else reads meanwhile.
            let out = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), d) };
            one(
                g,
                cache,
                pos + i,
                h / (heads / kv_heads),
                &q[at..at + d],
                out,
                &mut scores,
            );
        }
    };
    // One decode row of a small model is a few thousand multiply-adds: waking the pool would
    // cost more than it saves.
    if tasks * d * 64 < 1 << 16 {
        work(0..tasks);
    } else {
        candle_core::utils::barrier_pool().execute_chunked(tasks, work);
    }
    Ok(())
}

/// The lowest key position the query at `pos` sees.
fn lowest_key(g: &Geometry, pos: usize) -> usize {
    g.window.map_or(0, |w| (pos + 1).saturating_sub(w))
}

/// One (query row, head): softmax of the scaled scores over the visible keys, then the
/// weighted sum of their values, each summed in position order.
fn one(
    g: &Geometry,
    cache: &KvRows,
    pos: usize,
    kv_head: usize,
    q: &[f32],
    out: &mut [f32],
    scores: &mut Vec<f32>,
) {
    let d = g.head_dim;
    let keys = lowest_key(g, pos)..pos + 1;
    scores.clear();
    let mut max = f32::NEG_INFINITY;
    for p in keys.clone() {
        let s = dot(q, cache.key(p, kv_head, d)) * g.scale;
        max = max.max(s);
        scores.push(s);
    }
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (p, &w) in keys.zip(scores.iter()) {
        for (o, &v) in out.iter_mut().zip(cache.value(p, kv_head, d)) {
            *o += w * v;
        }
    }
    let inv = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Dot product with [`LANES`] partial sums, added in a fixed order.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let mut total = acc.iter().sum::<f32>();
    for (x, y) in ra.iter().zip(rb) {
        total += x * y;
    }
    total
}

/// An output pointer shared with the pool's workers.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: workers write disjoint elements (see `attend`).
unsafe impl Send for OutPtr {}
// SAFETY: as above.
unsafe impl Sync for OutPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) % 1000) as f32 / 500.0
                    - 1.0
            })
            .collect()
    }

    /// Straightforward attention in f64, the reference.
    fn reference(g: &Geometry, k: &[f32], v: &[f32], q: &[f32], pos: usize) -> Vec<f32> {
        let d = g.head_dim;
        let width = g.kv_heads * d;
        let mut out = vec![0f32; g.heads * d];
        for h in 0..g.heads {
            let kh = h / (g.heads / g.kv_heads);
            let keys: Vec<usize> = (lowest_key(g, pos)..=pos).collect();
            let s: Vec<f64> = keys
                .iter()
                .map(|&p| {
                    (0..d)
                        .map(|j| f64::from(q[h * d + j]) * f64::from(k[p * width + kh * d + j]))
                        .sum::<f64>()
                        * f64::from(g.scale)
                })
                .collect();
            let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
            let z: f64 = e.iter().sum();
            for j in 0..d {
                let acc: f64 = keys
                    .iter()
                    .zip(&e)
                    .map(|(&p, w)| w * f64::from(v[p * width + kh * d + j]))
                    .sum();
                out[h * d + j] = (acc / z) as f32;
            }
        }
        out
    }

    #[test]
    fn matches_the_reference_and_is_the_same_alone_chunked_or_batched() {
        for window in [None, Some(5)] {
            let g = Geometry {
                heads: 4,
                kv_heads: 2,
                head_dim: 16,
                window,
                scale: 0.25,
            };
            let (n, width, row) = (12, 2 * 16, 4 * 16);
            let (k, v, q) = (
                values(n * width, 1),
                values(n * width, 2),
                values(n * row, 3),
            );
            // Whole: all 12 rows at once.
            let mut cache = KvRows::new(width);
            cache.append(&k, &v).expect("append");
            let mut whole = vec![0f32; n * row];
            attend(
                &g,
                &mut [Queries {
                    cache: &cache,
                    pos: 0,
                    q: &q,
                    out: &mut whole,
                }],
            )
            .expect("attend");
            for p in 0..n {
                let want = reference(&g, &k, &v, &q[p * row..(p + 1) * row], p);
                for (a, b) in want.iter().zip(&whole[p * row..(p + 1) * row]) {
                    assert!((a - b).abs() < 1e-5, "position {p}: {a} vs {b}");
                }
            }
            // Chunked 7 + 5, the second chunk batched with an unrelated sequence.
            let mut chunked = KvRows::new(width);
            chunked
                .append(&k[..7 * width], &v[..7 * width])
                .expect("append");
            let mut first = vec![0f32; 7 * row];
            attend(
                &g,
                &mut [Queries {
                    cache: &chunked,
                    pos: 0,
                    q: &q[..7 * row],
                    out: &mut first,
                }],
            )
            .expect("attend");
            chunked
                .append(&k[7 * width..], &v[7 * width..])
                .expect("append");
            let other = cache.clone();
            let mut second = vec![0f32; 5 * row];
            let mut unrelated = vec![0f32; row];
            attend(
                &g,
                &mut [
                    Queries {
                        cache: &other,
                        pos: 11,
                        q: &q[3 * row..4 * row],
                        out: &mut unrelated,
                    },
                    Queries {
                        cache: &chunked,
                        pos: 7,
                        q: &q[7 * row..],
                        out: &mut second,
                    },
                ],
            )
            .expect("attend");
            first.extend(second);
            assert_eq!(first, whole, "bit-identical, window {window:?}");
        }
    }

    #[test]
    fn a_window_cache_forgets_and_truncates_only_what_it_can() {
        let mut c = KvRows::new(2);
        let rows = values(2 * 200, 4);
        c.append(&rows, &rows).expect("append");
        c.forget_before(10);
        assert_eq!(
            (c.first(), c.end()),
            (0, 200),
            "under SLACK dead rows: kept"
        );
        c.forget_before(150);
        assert_eq!((c.first(), c.end()), (150, 200));
        assert!(
            c.truncated(100, 180).is_none(),
            "positions before 150 are gone"
        );
        let t = c.truncated(160, 180).expect("held");
        assert_eq!((t.first(), t.end()), (160, 180));
        assert_eq!(t.key(170, 0, 2), c.key(170, 0, 2));
        assert!(c.append(&[1.0], &[1.0]).is_err(), "not a whole row");
    }
}
