//! The short fuzz pass of the test suite: each target on its whole corpus, then on a fixed
//! number of seeded mutants. `TRELLIS_FUZZ_MUTANTS` (per target) and `TRELLIS_FUZZ_SEED` run it
//! longer or elsewhere; a failing input is written to this test's temporary directory.

/// Mutants per target when `TRELLIS_FUZZ_MUTANTS` is not set: a few seconds each in a debug
/// build.
const MUTANTS: [(&str, usize); 6] = [
    ("h1_head", 30_000),
    ("h1_request", 30_000),
    ("h1_chunked", 80_000),
    ("snapshot", 40_000),
    ("manifest", 25_000),
    ("import", 20_000),
];

fn short_pass(name: &str) {
    let Some(target) = trellis_fuzz::target(name) else {
        panic!("no target {name}");
    };
    let env = |var: &str| std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok());
    let mutants = env("TRELLIS_FUZZ_MUTANTS").map_or_else(
        || {
            MUTANTS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(1_000, |m| m.1)
        },
        |n| n as usize,
    );
    let seed = env("TRELLIS_FUZZ_SEED").unwrap_or(0x7e11_1500);
    let save = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("fuzz-failures");
    match trellis_fuzz::short_pass(target, mutants, seed, Some(&save)) {
        Ok(summary) => assert!(
            summary.corpus >= 10,
            "{name}: a corpus of {} files",
            summary.corpus
        ),
        Err(failure) => panic!("{name} (seed {seed:#x}): {failure}"),
    }
}

#[test]
fn h1_head() {
    short_pass("h1_head");
}

#[test]
fn h1_request() {
    short_pass("h1_request");
}

#[test]
fn h1_chunked() {
    short_pass("h1_chunked");
}

#[test]
fn snapshot() {
    short_pass("snapshot");
}

#[test]
fn manifest() {
    short_pass("manifest");
}

#[test]
fn import() {
    short_pass("import");
}
