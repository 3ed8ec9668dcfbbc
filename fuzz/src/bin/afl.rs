//! One target under AFL++: `cargo afl build --release -p trellis-fuzz --features afl`, then
//! `cargo afl fuzz -i fuzz/corpus/<target> -o <out> target/release/trellis-fuzz-afl <target>`
//! (see fuzz/README.md).

fn main() {
    let name = std::env::args().nth(1).unwrap_or_default();
    let Some(target) = trellis_fuzz::target(&name) else {
        let names: Vec<_> = trellis_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!("usage: trellis-fuzz-afl <{}>", names.join("|"));
        std::process::exit(2);
    };
    afl::fuzz!(|data: &[u8]| (target.run)(data));
}
