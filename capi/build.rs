//! Hands the target triple to the tests, which compile C programs against the header.
fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=THOR_TARGET={target}");
}
