//! Fuzz targets for the parsers that take untrusted bytes: the proxy's HTTP/1.1 request-head and
//! response-head parsers and chunked body decoder, its snapshot compiler, and the control plane's manifest
//! validator, and `trellis import`'s readers.
//!
//! Each target is a plain `fn(&[u8])` that must not panic on any input and asserts properties
//! that are cheap to check. They run two ways: a short seeded pass in the test suite
//! ([`short_pass`], over the corpus in `fuzz/corpus/<target>/`), and for hours under AFL++ (the
//! `afl` feature; see `fuzz/README.md`).

pub mod h1;
pub mod h1_request;
pub mod import;
pub mod manifest;
pub mod mutator;
pub mod snapshot;

pub use mutator::{Failure, Summary, short_pass};

use std::path::{Path, PathBuf};

/// A fuzz target: its name (and corpus directory), the function, and the tokens its mutations
/// insert.
#[derive(Debug)]
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
    pub dictionary: &'static [&'static [u8]],
}

/// Every target.
pub const TARGETS: [Target; 6] = [
    Target {
        name: "h1_head",
        run: h1::head,
        dictionary: h1::DICTIONARY,
    },
    Target {
        name: "h1_request",
        run: h1_request::target,
        dictionary: h1_request::DICTIONARY,
    },
    Target {
        name: "h1_chunked",
        run: h1::chunked,
        dictionary: h1::DICTIONARY,
    },
    Target {
        name: "snapshot",
        run: snapshot::target,
        dictionary: snapshot::DICTIONARY,
    },
    Target {
        name: "manifest",
        run: manifest::target,
        dictionary: manifest::DICTIONARY,
    },
    Target {
        name: "import",
        run: import::target,
        dictionary: import::DICTIONARY,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// The directory holding a target's seed corpus.
pub fn corpus_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(name)
}

/// A target's corpus, in file-name order, with each file's name.
pub fn corpus(name: &str) -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(corpus_dir(name))? {
        let path = entry?.path();
        if path.is_file() {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            files.push((name, std::fs::read(&path)?));
        }
    }
    files.sort();
    Ok(files)
}

/// A 64-bit FNV-1a hash: derives a per-input seed (for how an input is split into reads) that
/// stays the same across runs, machines and Rust versions.
pub(crate) fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Splits `data` into consecutive pieces, as reads from a socket might deliver it: sizes drawn
/// from a seed derived from the data, between 1 and `max` bytes.
pub(crate) fn pieces(data: &[u8], max: usize) -> impl Iterator<Item = &[u8]> {
    let mut rng = fastrand::Rng::with_seed(fnv1a(data));
    let mut rest = data;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let n = rng.usize(1..=max.max(1)).min(rest.len());
        let (piece, tail) = rest.split_at(n);
        rest = tail;
        Some(piece)
    })
}
