//! Generations that own their code: a template process per generation
//! loads the app once and forks every worker of it.

mod common;

use std::time::{Duration, Instant};

use common::{alive, eventually, Scratch, Server};

fn echo(server: &Server) -> serde_json::Value {
    let r = server.get("/");
    assert_eq!(r.status, 200);
    serde_json::from_slice(&r.body).expect("echo's JSON")
}

fn template_pid(status: &serde_json::Value, generation: u64) -> u32 {
    let g = status["generations"]
        .as_array()
        .and_then(|gs| gs.iter().find(|g| g["generation"] == generation))
        .unwrap_or_else(|| panic!("no generation {generation} in {status}"));
    assert_eq!(g["spawn"], "template");
    g["template"]["pid"].as_u64().unwrap_or_else(|| panic!("no template pid in {g}")) as u32
}

/// A server whose worker command is a script in `scratch` (rewritable in
/// place), with `args` before the `--`; the script and the good body.
fn serve_script(scratch: &Scratch, args: &[&str]) -> (Server, std::path::PathBuf, String) {
    let good = format!("exec {} worker --app echo", env!("CARGO_BIN_EXE_monodon"));
    let program = scratch.script("app", &good);
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "2"]).args(args).arg("--").arg(&program);
    (Server::start_cmd(&mut cmd, 2), program, good)
}

fn ppid(pid: u32) -> u32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0)
}

#[test]
fn workers_are_forked_from_their_generations_template_and_are_the_supervisors_children() {
    let server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let status = server.wait_serving(1, Duration::from_secs(10));
    let template = template_pid(&status, 1);
    for w in server.children() {
        assert_ne!(w, template);
        assert_eq!(ppid(w), server.pid, "worker {w}'s parent");
    }
    let worker = &echo(&server)["worker"];
    assert_eq!(worker["preloaded_in"], template, "preload ran once, in the template: {worker}");
    assert_eq!(worker["initialised_in"], worker["pid"], "init_worker ran in the worker: {worker}");
    assert_eq!(worker["ppid"], server.pid);

    // A reload: a new template from disk, and its own workers.
    server.signal(libc::SIGHUP);
    let status = server.wait_serving(2, Duration::from_secs(10));
    let second = template_pid(&status, 2);
    assert_ne!(second, template);
    assert!(
        eventually(Duration::from_secs(10), || !alive(template)),
        "the old template exits with its generation"
    );
    let worker = &echo(&server)["worker"];
    assert_eq!(
        (worker["generation"].as_u64(), worker["preloaded_in"].as_u64()),
        (Some(2), Some(second as u64))
    );
}

#[test]
fn with_spawn_exec_each_worker_loads_the_app_itself() {
    let server = Server::start(&["--app", "echo", "--workers", "1", "--spawn", "exec"], 1);
    let worker = &echo(&server)["worker"];
    assert_eq!(worker["preloaded_in"], worker["pid"], "{worker}");
    assert_eq!(worker["initialised_in"], worker["pid"], "{worker}");
    let status = server.status().unwrap();
    assert_eq!(status["generations"][0]["spawn"], "exec");
    assert!(status["generations"][0]["template"].is_null());
}

/// The defect that started templates: a deploy that rewrites the worker's
/// program in place must not reach the running generation, whose
/// replacements (recycling every 5 requests here) come from its template.
#[test]
fn a_generation_keeps_its_code_when_its_program_is_rewritten_in_place() {
    let scratch = Scratch::new("templates-rewrite");
    let (server, program, good) =
        serve_script(&scratch, &["--max-requests-per-child", "5", "--min-requests-per-child", "5"]);
    let load = common::Load::start(server.addr, 2, 1, "/");
    load.wait_answered(50, Duration::from_secs(20));
    // Rewritten in place (the same inode), as a careless deploy does.
    std::fs::write(&program, "#!/bin/sh\nexit 7\n").unwrap();
    let recycled_before =
        server.status().unwrap()["totals"]["recycled"]["max-requests"].as_u64().unwrap_or(0);
    // 20 s of recycling under load: the pool stays whole.
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        let s = server.status().unwrap();
        let in_service =
            s["workers"]["total"].as_u64().unwrap_or(0) - s["workers"]["retiring"].as_u64().unwrap_or(0);
        assert!(in_service >= 2, "workers fell below the target: {}", s["workers"]);
        assert_eq!(s["totals"]["respawns"], 0, "no worker died: {}", server.logs());
        std::thread::sleep(Duration::from_millis(250));
    }
    let s = server.status().unwrap();
    let recycled = s["totals"]["recycled"]["max-requests"].as_u64().unwrap_or(0);
    assert!(
        recycled >= recycled_before + 10,
        "workers were recycled meanwhile ({recycled_before} -> {recycled})"
    );
    assert_eq!(s["generations"][0]["program_changed"], true);

    // A HUP tries the bad file: refused, generation 1 serves on.
    server.signal(libc::SIGHUP);
    let why = server.wait_reload_failed(Duration::from_secs(20));
    assert!(why.contains("status 7"), "{why}");
    load.wait_answered(50, Duration::from_secs(20));
    assert_eq!(server.status().unwrap()["generation"], 1);

    // The good file back, and a HUP recovers.
    std::fs::write(&program, format!("#!/bin/sh\n{good}\n")).unwrap();
    server.signal(libc::SIGHUP);
    server.wait_serving(3, Duration::from_secs(20));
    load.wait_answered(50, Duration::from_secs(20));
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{stats:?}");
}

#[test]
fn a_template_killed_under_load_is_replaced_and_recycling_goes_on() {
    let server = Server::start(
        &[
            "--app",
            "echo",
            "--workers",
            "2",
            "--max-requests-per-child",
            "5",
            "--min-requests-per-child",
            "5",
        ],
        2,
    );
    let template = template_pid(&server.wait_serving(1, Duration::from_secs(10)), 1);
    let load = common::Load::start(server.addr, 2, 1, "/");
    load.wait_answered(30, Duration::from_secs(20));
    // SAFETY: killing the supervisor's template, on purpose.
    unsafe { libc::kill(template as i32, libc::SIGKILL) };
    let s = server.wait_status(Duration::from_secs(20), "a new template, ready", |s| {
        s["generations"][0]["template"]["state"] == "ready"
            && s["generations"][0]["template"]["pid"].as_u64().is_some_and(|p| p != template as u64)
    });
    assert_eq!(s["generations"][0]["template"]["restarts"], 1);
    let second = template_pid(&s, 1);
    // Replacements keep coming, from the new template.
    let recycled = s["totals"]["recycled"]["max-requests"].as_u64().unwrap_or(0);
    server.wait_status(Duration::from_secs(20), "more recycling", |s| {
        s["totals"]["recycled"]["max-requests"].as_u64().unwrap_or(0) >= recycled + 4
    });
    let worker = &echo(&server)["worker"];
    assert_eq!(worker["preloaded_in"], second, "{worker}");
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{stats:?}");
}

#[test]
fn a_killed_supervisor_takes_its_templates_and_workers_down() {
    let mut server = Server::start(&["--app", "echo", "--workers", "2"], 2);
    let template = template_pid(&server.wait_serving(1, Duration::from_secs(10)), 1);
    let workers = common::children_of(server.pid);
    assert!(workers.contains(&template), "the template is the supervisor's child");
    server.signal(libc::SIGKILL);
    server.wait_exit(Duration::from_secs(5)).expect("killed");
    for pid in workers {
        assert!(eventually(Duration::from_secs(5), || !alive(pid)), "process {pid} outlived the supervisor");
    }
}

/// A template that cannot be started again (its program now fails): the
/// generation is degraded, serving with the workers it has, and says so;
/// once the program is good again, the next retry brings the template back.
#[test]
fn a_generation_whose_template_cannot_restart_is_degraded_and_recovers() {
    let scratch = Scratch::new("templates-degraded");
    // Recycling every 20 requests: while no replacement can be made, the
    // workers must serve on past their limit instead of leaving.
    let limit = ["--max-requests-per-child", "20", "--min-requests-per-child", "20"];
    let (server, program, good) = serve_script(&scratch, &limit);
    let template = template_pid(&server.wait_serving(1, Duration::from_secs(10)), 1);
    let load = common::Load::start(server.addr, 2, 1, "/");
    load.wait_answered(20, Duration::from_secs(20));
    std::fs::write(&program, "#!/bin/sh\nexit 7\n").unwrap();
    // SAFETY: killing the supervisor's template, on purpose.
    unsafe { libc::kill(template as i32, libc::SIGKILL) };
    let degraded =
        server.wait_status(Duration::from_secs(20), "the template down after a failed restart", |s| {
            let t = &s["generations"][0]["template"];
            t["state"] == "down" && t["restarts"].as_u64().unwrap_or(0) >= 1
        });
    assert_eq!(degraded["generations"][0]["limits_held"], true, "{degraded}");
    let text = String::from_utf8_lossy(
        &common::monodon().args(["status", "--control"]).arg(&server.control).output().unwrap().stdout,
    )
    .into_owned();
    assert!(text.contains("DEGRADED") && text.contains("past their max-requests"), "{text}");
    // Still serving with the workers it has, each well past its limit.
    let workers_now = || {
        let s = server.status().unwrap();
        let pids: Vec<u64> = s["worker_list"]
            .as_array()
            .map(|l| l.iter().filter_map(|w| w["pid"].as_u64()).collect())
            .unwrap_or_default();
        (pids, s["totals"]["requests"].as_u64().unwrap_or(0))
    };
    // (One may have left at its limit in the moment between the kill and
    // the supervisor seeing it; from then on, none leaves.)
    let (held, requests_then) = workers_now();
    assert!(!held.is_empty(), "{held:?}");
    load.wait_answered(100, Duration::from_secs(30));
    let (still, _) = workers_now();
    assert_eq!(still, held, "the degraded generation kept its workers ({requests_then} requests before)");
    std::fs::write(&program, format!("#!/bin/sh\n{good}\n")).unwrap();
    let back = server.wait_status(Duration::from_secs(30), "the template back", |s| {
        s["generations"][0]["template"]["state"] == "ready"
    });
    assert_eq!(back["generations"][0]["limits_held"], false, "{back}");
    // Recycling resumes: the held workers leave, replaced from the template.
    server.wait_status(Duration::from_secs(30), "the held workers replaced", |s| {
        let list = s["worker_list"].as_array().cloned().unwrap_or_default();
        let fresh = |w: &serde_json::Value| w["pid"].as_u64().is_some_and(|p| !held.contains(&p));
        list.len() == 2 && list.iter().all(fresh)
    });
    let stats = load.stop();
    assert_eq!(stats.failed, 0, "{stats:?}");
}

/// A template that loads and then dies at every Fork is restarted with a
/// growing back-off, not ten times a second for ever: only a worker it
/// forked coming ready shows that it works. It is written in Python (the
/// protocol's TemplateReady, then an exit when the Fork comes).
#[test]
fn a_template_that_dies_at_every_fork_is_restarted_with_a_growing_back_off() {
    if !common::installed("python3", "--version", "python3") {
        return;
    }
    let scratch = Scratch::new("templates-flapping");
    let template = scratch.0.join("dies_at_fork.py");
    std::fs::write(
        &template,
        "import os, socket, struct\n\
         channel = socket.socket(fileno=3)\n\
         channel.sendmsg([bytes((1, 16)) + struct.pack('<I', os.getpid())])\n\
         channel.recvmsg(65536, 64)\n\
         os._exit(3)\n",
    )
    .unwrap();
    let mut cmd = common::monodon();
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--workers", "1", "--", "python3"]).arg(&template);
    let server = Server::start_cmd(&mut cmd, 0);
    // 100, 200, 400, 800 ms: the fourth restart in a row waits 800 ms.
    server.wait_for_log("its workers keep serving; next start in 800ms", Duration::from_secs(20));
    let status = server.status().unwrap();
    assert!(status["generations"][0]["template"]["restarts"].as_u64() >= Some(3), "{status}");
}
