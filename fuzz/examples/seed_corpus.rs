//! Writes the seed inputs of every target into a corpus folder:
//! `cargo run --manifest-path fuzz/Cargo.toml --example seed_corpus -- DIR`
//! (DIR/<target>/seed-*). `cargo xtask fuzz` minimises them with the rest.

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os()
        .nth(1)
        .ok_or_else(|| std::io::Error::other("usage: seed_corpus DIR"))?;
    let count = fencelab_fuzz::seeds::write_corpus(std::path::Path::new(&dir))?;
    eprintln!("{count} seeds written under {}", dir.to_string_lossy());
    Ok(())
}
