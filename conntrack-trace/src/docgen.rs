//! Documentation generated from the command line itself: man pages
//! (`clap_mangen`, one for the tool and one per subcommand) and shell
//! completions (`clap_complete`). Both read [`Cli::command`], so they
//! cannot drift from the flags; `cargo xtask package` ships their output
//! and `conntrack-trace man` / `completions` give them to people who build
//! from source.

use std::{
    fs, io,
    path::{Path, PathBuf},
};

use clap::CommandFactory as _;
pub use clap_complete::Shell;

use crate::{
    cli::Cli,
    formats::output::pipe::{Pipe, diag},
    kernel::error::exit,
};

/// The name of the binary (and of every page and completion).
pub const BIN: &str = "conntrack-trace";

/// The complete command tree, subcommands built (so each knows its full
/// name, `conntrack-trace-trace`, as man pages need).
pub fn command() -> clap::Command {
    let mut c = Cli::command();
    c.build();
    c
}

/// The completion script for `shell`. Generated into memory: clap_complete
/// panics on a write error, and writing is the caller's (EPIPE, ENOSPC).
pub fn completions(shell: Shell) -> Vec<u8> {
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), BIN, &mut buf);
    buf
}

/// The subcommands a user types (not clap's `help`, nor hidden ones).
pub fn subcommands(cmd: &clap::Command) -> impl Iterator<Item = &clap::Command> {
    cmd.get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
}

/// Renders the main page (`conntrack-trace.1`) to `out`.
pub fn man_main(out: &mut dyn io::Write) -> io::Result<()> {
    clap_mangen::Man::new(command()).render(out)
}

/// Writes `conntrack-trace.1` and one `conntrack-trace-SUB.1` per
/// subcommand into `dir` (created if missing); returns the files written.
pub fn man_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let cmd = command();
    let mut written = Vec::new();
    let mut page = |c: clap::Command, name: String| -> io::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut buf = Vec::new();
        // Built, a subcommand's display name is `conntrack-trace-SUB` (the
        // page's title and NAME) and its bin name `conntrack-trace SUB`
        // (its SYNOPSIS).
        clap_mangen::Man::new(c).render(&mut buf)?;
        fs::write(&path, buf)?;
        written.push(path);
        Ok(())
    };
    page(cmd.clone(), BIN.to_owned())?;
    for sub in subcommands(&cmd) {
        page(sub.clone(), format!("{BIN}-{}", sub.get_name()))?;
    }
    Ok(written)
}

/// `conntrack-trace completions SHELL`: the script on stdout; returns the
/// exit code (a reader who left is fine, any other write error is one
/// line on stderr).
pub fn completions_cmd(shell: Shell) -> i32 {
    to_stdout(|out| out.write_all(&completions(shell)))
}

/// `conntrack-trace man [DIR]`: every page into DIR (one line per file on
/// stderr), or the main page on stdout; returns the exit code.
pub fn man_cmd(dir: Option<&Path>) -> i32 {
    let Some(dir) = dir else {
        return to_stdout(|out| man_main(out));
    };
    match man_pages(dir) {
        Ok(pages) => {
            for p in pages {
                diag(format_args!("conntrack-trace: wrote {}", p.display()));
            }
            exit::OK
        }
        Err(e) => {
            diag(format_args!(
                "conntrack-trace: error: writing man pages into {}: {e}",
                dir.display()
            ));
            exit::FAILURE
        }
    }
}

fn to_stdout(write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>) -> i32 {
    let mut out = Pipe::new(io::stdout().lock());
    match write(&mut out).and_then(|_| io::Write::flush(&mut out)) {
        Ok(()) => exit::OK,
        Err(e) => {
            diag(format_args!(
                "conntrack-trace: error: writing to stdout: {e}"
            ));
            exit::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_page_per_subcommand_each_titled_with_its_name() {
        let dir = std::env::temp_dir().join(format!("ctt-docgen-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let pages = man_pages(&dir).unwrap();
        let cmd = command();
        let mut want = vec![format!("{BIN}.1")];
        want.extend(subcommands(&cmd).map(|s| format!("{BIN}-{}.1", s.get_name())));
        let mut got: Vec<String> = pages
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        got.sort();
        want.sort();
        assert_eq!(got, want);
        assert!(got.contains(&"conntrack-trace-trace.1".to_owned()));
        let trace = fs::read_to_string(dir.join("conntrack-trace-trace.1")).unwrap();
        assert!(trace.contains(".TH conntrack-trace-trace 1"), "{trace}");
        // SYNOPSIS names the command as typed.
        assert!(trace.contains("conntrack\\-trace trace"), "{trace}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn completions_name_the_binary_and_its_flags() {
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let s = String::from_utf8(completions(shell)).unwrap();
            assert!(s.contains(BIN), "{shell}");
            assert!(s.contains("ready-file"), "{shell}: flags of subcommands");
        }
    }
}
