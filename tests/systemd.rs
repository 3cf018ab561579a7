//! The unit files in `systemd/`, under a real systemd user manager
//! (`tests/systemd/sandbox.sh`): READY, STATUS=, reload, the control
//! socket in RuntimeDirectory=, the access log in LogsDirectory=, socket
//! activation and a clean stop. The checks themselves are in
//! `tests/systemd/units.sh`.
//!
//! Needs root and systemd; without them the test says so and passes, unless
//! `CI` is set, where it must run.

use std::path::PathBuf;
use std::process::Command;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn unit_files_under_a_real_systemd() {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let sandbox = repo.join("tests/systemd/sandbox.sh");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let usable = root && PathBuf::from("/lib/systemd/systemd").exists();
    if !usable {
        assert!(std::env::var_os("CI").is_none(), "CI must run the systemd tests (root, systemd)");
        eprintln!("skipped: needs root and systemd (/lib/systemd/systemd)");
        return;
    }
    let out = Command::new(&sandbox)
        .arg(repo.join("tests/systemd/units.sh"))
        .arg(&repo)
        .arg(env!("CARGO_BIN_EXE_monodon"))
        .arg(free_port().to_string())
        .output()
        .expect("run the systemd sandbox");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprint!("{stdout}");
    assert!(out.status.success(), "systemd checks failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("all systemd checks passed"), "{stdout}");
}
