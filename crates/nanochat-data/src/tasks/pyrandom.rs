//! A bit-exact port of the parts of CPython's `random.Random` that nanochat's tasks and
//! evaluation depend on: integer seeding, `random`, `choice`, `shuffle` and `sample`.
//!
//! Why port a PRNG instead of using `rand`: CORE shuffles every task with `Random(1337)` and draws
//! the few-shot examples of item `i` with `Random(1234 + i).sample(...)`, and the spelling tasks
//! draw item `i` from `Random(i)` (test split: `Random(10_000_000 + i)`). Using the same
//! generator (MT19937 with CPython's `init_by_array` seeding and its rejection-sampling
//! `_randbelow`) means the same items are evaluated with the same prompts, so the numbers (and
//! `max_per_task` subsets) are comparable with the reference.

const N: usize = 624;
const M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// CPython-compatible Mersenne Twister.
#[derive(Clone)]
pub struct PyRandom {
    state: [u32; N],
    index: usize,
}

impl std::fmt::Debug for PyRandom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PyRandom")
            .field("index", &self.index)
            .finish()
    }
}

impl PyRandom {
    /// Equivalent of `random.Random(seed)` for a non-negative integer seed.
    pub fn new(seed: u64) -> Self {
        // CPython splits abs(seed) into 32-bit words, least significant first; zero is [0].
        let low = seed as u32;
        let high = (seed >> 32) as u32;
        let key: Vec<u32> = if high == 0 {
            vec![low]
        } else {
            vec![low, high]
        };
        let mut rng = PyRandom {
            state: [0; N],
            index: N,
        };
        rng.init_by_array(&key);
        rng
    }

    fn init_genrand(&mut self, seed: u32) {
        self.state[0] = seed;
        for i in 1..N {
            let prev = self.state[i - 1];
            self.state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        self.index = N;
    }

    fn init_by_array(&mut self, key: &[u32]) {
        self.init_genrand(19_650_218);
        let mut i = 1usize;
        let mut j = 0usize;
        let mut k = N.max(key.len());
        while k > 0 {
            let prev = self.state[i - 1];
            self.state[i] = (self.state[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_664_525))
                .wrapping_add(key[j])
                .wrapping_add(j as u32);
            i += 1;
            j += 1;
            if i >= N {
                self.state[0] = self.state[N - 1];
                i = 1;
            }
            if j >= key.len() {
                j = 0;
            }
            k -= 1;
        }
        k = N - 1;
        while k > 0 {
            let prev = self.state[i - 1];
            self.state[i] = (self.state[i] ^ (prev ^ (prev >> 30)).wrapping_mul(1_566_083_941))
                .wrapping_sub(i as u32);
            i += 1;
            if i >= N {
                self.state[0] = self.state[N - 1];
                i = 1;
            }
            k -= 1;
        }
        self.state[0] = 0x8000_0000;
        self.index = N;
    }

    fn twist(&mut self) {
        for kk in 0..N {
            let y = (self.state[kk] & UPPER_MASK) | (self.state[(kk + 1) % N] & LOWER_MASK);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[kk] = self.state[(kk + M) % N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// One tempered 32-bit output (`genrand_uint32`).
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `getrandbits(k)` for `k <= 32` (all this crate needs).
    fn getrandbits(&mut self, k: u32) -> u32 {
        debug_assert!(k <= 32);
        if k == 0 {
            return 0;
        }
        self.next_u32() >> (32 - k)
    }

    /// `_randbelow(n)`: uniform in `[0, n)` by rejection on `bit_length(n)` random bits.
    pub fn randbelow(&mut self, n: usize) -> usize {
        assert!(n <= u32::MAX as usize, "randbelow supports n < 2^32");
        if n == 0 {
            return 0;
        }
        let k = usize::BITS - n.leading_zeros();
        loop {
            let r = self.getrandbits(k) as usize;
            if r < n {
                return r;
            }
        }
    }

    /// `random()`: a float in `[0, 1)` from two outputs (27 + 26 bits), as `genrand_res53`.
    pub fn random(&mut self) -> f64 {
        let a = (self.next_u32() >> 5) as f64;
        let b = (self.next_u32() >> 6) as f64;
        (a * 67_108_864.0 + b) * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `choice(seq)`: one element picked with `_randbelow(len)`; `None` for an empty slice
    /// (where CPython raises `IndexError`).
    pub fn choice<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            return None;
        }
        items.get(self.randbelow(items.len()))
    }

    /// In-place Fisher-Yates exactly as `random.shuffle`.
    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.randbelow(i + 1);
            items.swap(i, j);
        }
    }

    /// `random.sample(population, k)` returning the chosen elements in selection order.
    ///
    /// CPython switches between a pool-based and a set-based algorithm depending on `n` and `k`;
    /// both consume the generator differently, so both are reproduced.
    pub fn sample<T: Clone>(&mut self, population: &[T], k: usize) -> Option<Vec<T>> {
        let n = population.len();
        if k > n {
            return None;
        }
        let mut setsize = 21usize;
        if k > 5 {
            let exp = ((k * 3) as f64).ln() / 4f64.ln();
            setsize += 4usize.pow(exp.ceil() as u32);
        }
        let mut result = Vec::with_capacity(k);
        if n <= setsize {
            let mut pool: Vec<T> = population.to_vec();
            for i in 0..k {
                let j = self.randbelow(n - i);
                result.push(pool[j].clone());
                pool[j] = pool[n - i - 1].clone();
            }
        } else {
            let mut selected = std::collections::HashSet::with_capacity(k);
            for _ in 0..k {
                let mut j = self.randbelow(n);
                while selected.contains(&j) {
                    j = self.randbelow(n);
                }
                selected.insert(j);
                result.push(population[j].clone());
            }
        }
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Goldens printed by CPython 3.11:
    //   r = random.Random(42); [r.getrandbits(32) for _ in range(3)]
    #[test]
    fn raw_outputs_match_cpython() {
        let mut r = PyRandom::new(42);
        let got: Vec<u32> = (0..3).map(|_| r.next_u32()).collect();
        assert_eq!(got, vec![2_746_317_213, 478_163_327, 107_420_369]);
    }

    //   x = list(range(10)); random.Random(1337).shuffle(x); x
    #[test]
    fn shuffle_matches_cpython() {
        let mut x: Vec<u32> = (0..10).collect();
        PyRandom::new(1337).shuffle(&mut x);
        assert_eq!(x, vec![0, 3, 7, 2, 1, 6, 4, 5, 8, 9]);
    }

    //   random.Random(1234 + 5).sample([i for i in range(100) if i != 5], 10)  (set branch)
    //   random.Random(1234).sample(list(range(8)), 3)                           (pool branch)
    #[test]
    fn sample_matches_cpython_both_branches() {
        let pop: Vec<usize> = (0..100).filter(|&i| i != 5).collect();
        let got = PyRandom::new(1239).sample(&pop, 10).unwrap();
        assert_eq!(got, vec![10, 36, 59, 3, 7, 14, 62, 88, 83, 21]);
        let pop: Vec<usize> = (0..8).collect();
        let got = PyRandom::new(1234).sample(&pop, 3).unwrap();
        assert_eq!(got, vec![7, 0, 6]);
        assert!(PyRandom::new(1).sample(&pop, 9).is_none());
    }

    //   r = random.Random(10_000_003); [r.random() for _ in range(2)], r.choice(range(370105)),
    //   r.choice("strawberry")
    #[test]
    fn random_and_choice_match_cpython() {
        let mut r = PyRandom::new(10_000_003);
        let want = (0.1932888414592686, 0.17568543108211154, 251_853, 's');
        assert_eq!(r.random(), want.0);
        assert_eq!(r.random(), want.1);
        let big: Vec<usize> = (0..370_105).collect();
        assert_eq!(*r.choice(&big).unwrap(), want.2);
        let chars: Vec<char> = "strawberry".chars().collect();
        assert_eq!(*r.choice(&chars).unwrap(), want.3);
        assert!(r.choice::<u8>(&[]).is_none());
    }

    //   random.Random(2**40 + 7).getrandbits(32)  (two-word seed)
    #[test]
    fn large_seed_uses_two_words() {
        let mut r = PyRandom::new((1u64 << 40) + 7);
        assert_eq!(r.next_u32(), 2_635_837_658);
    }
}
