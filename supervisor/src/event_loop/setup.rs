//! Start-up: binding or adopting the listeners, the control socket, the
//! signal pipe, privileges, and the process limits the supervisor needs.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::poll::{Event, Events, PollMode, Poller};
use log::{debug, info, warn};
use monodon_proto::access_log::AccessLog;
use signal_hook::consts::signal::{SIGCHLD, SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGTTIN, SIGTTOU, SIGUSR1};
use signal_hook::iterator::backend::SignalDelivery;
use signal_hook::iterator::exfiltrator::SignalOnly;
use slab::Slab;

use super::{control, metrics, Core, Supervisor, CONTROL_KEY, LISTENER_BASE, READ_CHUNK, SIGNAL_KEY};
use crate::config::Config;
use crate::core::Settings;
use crate::listener::Listener;
use crate::notify::Notifier;
use crate::spawn::Code;

impl Supervisor {
    /// Binds the listeners and installs the signal handlers; no worker yet.
    pub fn new(config: Config) -> io::Result<Supervisor> {
        // A configuration whose messages cannot cross a worker channel is
        // refused now, not found out at the first large request.
        crate::spawn::channel(&config.limits)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        raise_fd_limit();
        let poller = Poller::new()?;
        // Workers forked by a template (forked twice) are re-parented to us,
        // so they are our children like exec'd ones: reaped, signalled,
        // and their PDEATHSIG set against us.
        nix::sys::prctl::set_child_subreaper(true)?;
        mark_inherited_fds_cloexec();
        let max_connections = match config.max_connections {
            0 => default_max_connections(config.workers),
            n => n,
        };
        let mut listeners = crate::listener::inherited()?;
        for l in &listeners {
            info!("listening on {} (inherited)", l.addr);
        }
        if listeners.is_empty() {
            for addr in &config.listen {
                let l = Listener::bind(addr, config.backlog)?;
                info!("listening on {}", l.addr);
                listeners.push(l);
            }
        }
        for (i, l) in listeners.iter().enumerate() {
            // SAFETY: each listener is deleted from the poller before it is
            // dropped (see `close_listeners`).
            unsafe {
                poller.add_with_mode(
                    l.fd().as_raw_fd(),
                    Event::readable(LISTENER_BASE + i),
                    PollMode::Level,
                )?
            };
        }
        let control_path = config
            .control
            .clone()
            .unwrap_or_else(|| crate::control::default_control_path(listeners.first().map(|l| &l.addr)));
        let inherited = listeners.iter().any(|l| l.is_inherited());
        let control_socket = control::bind_control(&control_path, inherited)?;
        let control_listener = &control_socket.listener;
        // SAFETY: the control listener lives as long as the supervisor.
        unsafe {
            poller.add_with_mode(
                control_listener.as_raw_fd(),
                Event::readable(CONTROL_KEY),
                PollMode::Level,
            )?
        };
        info!("control socket at {}", control_path.display());
        let metrics = match &config.metrics {
            Some(addr) => {
                let endpoint = metrics::bind_metrics(addr, &poller)?;
                info!("metrics at http://{}/metrics", endpoint.addr());
                Some(endpoint)
            }
            None => None,
        };
        if let Some(run_as) = &config.run_as {
            let mut owned: Vec<&std::path::Path> = vec![&control_path];
            if let Some(log) = config.access_log.as_deref().filter(|p| *p != "-") {
                owned.push(std::path::Path::new(log));
            }
            run_as.drop_to(&owned)?;
        }
        let control = Some(control_socket);
        let access_log = open_access_log(&config)?;
        let (read, write) = UnixStream::pair()?;
        read.set_nonblocking(true)?;
        write.set_nonblocking(true)?;
        let signals = SignalDelivery::with_pipe(
            read,
            write,
            SignalOnly,
            [SIGTERM, SIGINT, SIGQUIT, SIGCHLD, SIGHUP, SIGTTIN, SIGTTOU, SIGUSR1],
        )?;
        // SAFETY: the signal pipe lives as long as the supervisor (and so the poller).
        unsafe {
            poller.add_with_mode(
                signals.get_read().as_raw_fd(),
                Event::readable(SIGNAL_KEY),
                PollMode::Level,
            )?
        };
        let now = Instant::now();
        Ok(Supervisor {
            core: Core::new(Settings::from(&config), config.workers, now, fastrand::u64(..)),
            serving_code: Code::resolve(&config.worker_command, config.chdir.as_deref())?,
            reload_code: None,
            templates: Default::default(),
            unclaimed_exits: Default::default(),
            spare_boards: Default::default(),
            config,
            poller,
            events: Events::new(),
            listeners,
            accepting: true,
            accept_paused_until: None,
            backlog_seen: None,
            workers_stalled: false,
            signals,
            scratch: vec![0; READ_CHUNK],
            channel_buf: Vec::new(),
            msg: Vec::with_capacity(READ_CHUNK),
            next_sweep: now,
            control,
            metrics,
            control_conns: Slab::new(),
            started: now,
            notifier: Notifier::from_env(),
            others_waiting: false,
            max_connections,
            rate_sample: (now, 0),
            requests_per_sec: 0.0,
            next_memory_check: now,
            access_log,
            own_responses: Default::default(),
            departed_responses: Default::default(),
        })
    }
}

/// The access log named by the configuration, if any, opened (created) now.
pub(super) fn open_access_log(config: &Config) -> io::Result<Option<AccessLog>> {
    let Some(path) = config.access_log.as_deref() else { return Ok(None) };
    AccessLog::open(path, config.access_log_format)
        .map(Some)
        .map_err(|e| io::Error::new(e.kind(), format!("access log {path}: {e}")))
}

/// Every idle client costs the supervisor one descriptor: raise the soft
/// limit to the hard one, as a front-line server should.
pub(super) fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                Ok(()) => debug!("open file limit raised from {soft} to {hard}"),
                Err(e) => warn!("cannot raise the open file limit from {soft}: {e}"),
            }
        }
    }
}

/// As many connections as the open-file limit allows, less room for the
/// supervisor's other descriptors (listeners, channels, scoreboards, logs).
pub(super) fn default_max_connections(workers: usize) -> usize {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map(|(s, _)| s)
        .unwrap_or(1024);
    let reserve = 64 + 4 * workers as u64;
    usize::try_from(soft.saturating_sub(reserve)).unwrap_or(usize::MAX).max(16)
}

/// Whatever descriptors the launcher left open must not reach the workers:
/// mark every inherited fd above stderr close-on-exec (listeners inherited
/// on purpose are adopted afterwards, and are close-on-exec too).
pub(super) fn mark_inherited_fds_cloexec() {
    // SAFETY: close_range with CLOSE_RANGE_CLOEXEC closes nothing; it only
    // sets a flag on descriptors of this process.
    let rc = unsafe { libc::close_range(3, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_int) };
    if rc != 0 {
        debug!("close_range: {}", io::Error::last_os_error());
    }
}
