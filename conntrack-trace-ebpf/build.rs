//! Fail early, with the fix in the message, when bpf-linker is missing:
//! otherwise rustc reports an obscure linker error from inside aya-build.
use which::which;

fn main() {
    // Rebuild when bpf-linker is (re)installed: it may have been built
    // against a different LLVM.
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(err) => {
            println!("cargo:warning=bpf-linker not found ({err}); run `cargo xtask setup`");
        }
    }
}
