//! The short pass: every corpus file, then a seeded, deterministic mutation loop over the corpus
//! (byte flips, inserts, deletes, copies, splices between entries, dictionary tokens). No
//! coverage feedback — that is what the long run under AFL++ adds.

use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::PathBuf,
};

use crate::Target;

/// Mutants are kept at most this long.
const MAX_LEN: usize = 16 * 1024;

/// Mutates inputs: a few stacked edits each, drawn from a seeded generator.
#[derive(Debug)]
pub struct Mutator<'a> {
    rng: fastrand::Rng,
    corpus: &'a [Vec<u8>],
    dictionary: &'a [&'a [u8]],
}

impl<'a> Mutator<'a> {
    pub fn new(seed: u64, corpus: &'a [Vec<u8>], dictionary: &'a [&'a [u8]]) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
            corpus,
            dictionary,
        }
    }

    /// The next input: a corpus entry (or, half the time, the previous mutant, so that edits
    /// accumulate) with one to four edits.
    pub fn mutate(&mut self, previous: &mut Vec<u8>) {
        if previous.is_empty() || self.rng.bool() {
            previous.clear();
            if !self.corpus.is_empty() {
                previous.extend_from_slice(&self.corpus[self.rng.usize(..self.corpus.len())]);
            }
        }
        for _ in 0..self.rng.usize(1..=4) {
            self.edit(previous);
        }
        previous.truncate(MAX_LEN);
    }

    fn edit(&mut self, input: &mut Vec<u8>) {
        let rng = &mut self.rng;
        let len = input.len();
        let at = rng.usize(..=len);
        match rng.u8(..10) {
            // Flip a bit.
            0 if len > 0 => {
                let i = rng.usize(..len);
                input[i] ^= 1 << rng.u8(..8);
            }
            // Set a byte: any, or ASCII text.
            1 if len > 0 => {
                let i = rng.usize(..len);
                input[i] = if rng.bool() {
                    rng.u8(..)
                } else {
                    rng.u8(b' '..=b'~')
                };
            }
            // Insert a few bytes.
            2 => {
                let n = rng.usize(1..=4);
                let bytes: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                input.splice(at..at, bytes);
            }
            // Delete a range.
            3 if len > 0 => {
                let end = (at + rng.usize(1..=16)).min(len);
                input.drain(at.min(end)..end);
            }
            // Copy a range elsewhere (repeats headers, chunks, list items).
            4 if len > 0 => {
                let start = rng.usize(..len);
                let end = (start + rng.usize(1..=64)).min(len);
                let copy = input[start..end].to_vec();
                input.splice(at..at, copy);
            }
            // Insert a dictionary token.
            5 | 6 if !self.dictionary.is_empty() => {
                let token = self.dictionary[rng.usize(..self.dictionary.len())];
                input.splice(at..at, token.iter().copied());
            }
            // Overwrite with a dictionary token.
            7 if !self.dictionary.is_empty() => {
                let token = self.dictionary[rng.usize(..self.dictionary.len())];
                let end = (at + token.len()).min(len);
                input.splice(at..end, token.iter().copied());
            }
            // Splice: this input's head, another entry's tail.
            8 if !self.corpus.is_empty() => {
                let other = &self.corpus[rng.usize(..self.corpus.len())];
                let from = rng.usize(..=other.len());
                input.truncate(at);
                input.extend_from_slice(&other[from..]);
            }
            // Truncate.
            _ => input.truncate(at),
        }
    }
}

/// What a short pass ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    pub corpus: usize,
    pub mutants: usize,
}

/// An input the target panicked on.
#[derive(Debug)]
pub struct Failure {
    /// The corpus file, or `mutant #n`.
    pub input: String,
    pub message: String,
    pub bytes: Vec<u8>,
    /// Where the input was written, to replay or add to the corpus.
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const SHOWN: usize = 2048;
        let shown = &self.bytes[..self.bytes.len().min(SHOWN)];
        write!(
            f,
            "{} panicked: {}\ninput ({} bytes{}): \"{}\"",
            self.input,
            self.message,
            self.bytes.len(),
            if self.bytes.len() > SHOWN {
                ", start shown"
            } else {
                ""
            },
            shown.escape_ascii()
        )?;
        if let Some(path) = &self.saved {
            write!(f, "\nsaved to {}", path.display())?;
        }
        Ok(())
    }
}

fn run_one(target: &Target, bytes: &[u8]) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| (target.run)(bytes))).map_err(|panic| {
        panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "(no message)".into())
    })
}

/// Runs `target` on every corpus file, then on `mutants` mutants drawn from `seed`; stops at
/// the first panic, which it writes under `save_dir` (when given) as `<target>-<hash>`.
pub fn short_pass(
    target: &Target,
    mutants: usize,
    seed: u64,
    save_dir: Option<&std::path::Path>,
) -> Result<Summary, Box<Failure>> {
    let corpus = crate::corpus(target.name).map_err(|e| {
        Box::new(Failure {
            input: format!("corpus {}", crate::corpus_dir(target.name).display()),
            message: e.to_string(),
            bytes: Vec::new(),
            saved: None,
        })
    })?;
    let fail = |input: String, message: String, bytes: &[u8]| {
        let saved = save_dir.and_then(|dir| {
            let path = dir.join(format!("{}-{:016x}", target.name, crate::fnv1a(bytes)));
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(&path, bytes))
                .ok()
                .map(|()| path)
        });
        Box::new(Failure {
            input,
            message,
            bytes: bytes.to_vec(),
            saved,
        })
    };
    for (name, bytes) in &corpus {
        run_one(target, bytes)
            .map_err(|m| fail(format!("corpus file {}/{name}", target.name), m, bytes))?;
    }
    let entries: Vec<Vec<u8>> = corpus.into_iter().map(|(_, b)| b).collect();
    let mut mutator = Mutator::new(seed, &entries, target.dictionary);
    let mut input = Vec::new();
    for i in 0..mutants {
        mutator.mutate(&mut input);
        run_one(target, &input).map_err(|m| fail(format!("mutant #{i}"), m, &input))?;
    }
    Ok(Summary {
        corpus: entries.len(),
        mutants,
    })
}
