//! Runs a target on files (a crash from the long run, a corpus): `cargo run -p trellis-fuzz
//! --bin replay -- <target> <file>...`. A panic names the file and exits non-zero.

fn main() {
    let mut args = std::env::args().skip(1);
    let name = args.next().unwrap_or_default();
    let Some(target) = trellis_fuzz::target(&name) else {
        let names: Vec<_> = trellis_fuzz::TARGETS.iter().map(|t| t.name).collect();
        eprintln!("usage: replay <{}> <file>...", names.join("|"));
        std::process::exit(2);
    };
    for path in args {
        match std::fs::read(&path) {
            Ok(bytes) => {
                eprintln!("{name}: {path} ({} bytes)", bytes.len());
                (target.run)(&bytes);
            }
            Err(e) => {
                eprintln!("{path}: {e}");
                std::process::exit(2);
            }
        }
    }
}
