//! Proxy benchmark: Harbor's embedded proxy side by side with peer proxies, in one run, on this
//! machine, with ratios.
//!
//! Cases (each target measured `RUNS` times, rounds interleaved so that background noise is
//! spread over every target, each round starting one target further along; medians printed; a
//! run in which the hypervisor stole 10 % of the machine's time or more is printed but left out
//! of the medians):
//! 1. small HTTP: `wrk -t2 -c64 -d5s --latency` against an nginx answering `ok\n` — direct, and
//!    through Harbor, HAProxy (`mode http`), Caddy (`reverse_proxy`) and Envoy (HTTP connection
//!    manager): requests/s, p99, ratios, and the proxy's CPU per request;
//! 2. one TCP stream: `iperf3 -t 5` direct and through Harbor (tcp route), HAProxy (`mode tcp`)
//!    and Envoy (`tcp_proxy`): Gbit/s and ratio to direct;
//! 3. new TCP connections: 32 tasks in this process, each looping connect → write 16 bytes →
//!    read them back → close for 5 s, against `harbor echo` — direct, through Harbor's tcp route
//!    and through HAProxy (`mode tcp`): connections/s and the proxy's CPU per connection, over
//!    `CONN_RUNS` rounds, with Harbor's ratio to HAProxy taken round by round (median and
//!    quartiles), which is what the goal is judged on;
//! 4. idle connections: 1,000 keep-alive connections opened to each proxy, each used once (an
//!    HTTP request answered, or 16 bytes echoed through a tcp route) and then left idle; the
//!    growth of the proxy's resident memory, per connection, against HAProxy's (`mode http`
//!    and `mode tcp`); then 1,000 connections each holding an unfinished 60,000-byte request
//!    head (under Harbor's 64 KiB limit: the most a client can make it hold);
//! 5. HTTPS: the same certificate (ECDSA P-256) on Harbor's TLS listener, HAProxy (OpenSSL),
//!    Caddy and Envoy, in front of the nginx: keep-alive requests/s and, with every request on
//!    a new connection, full TLS 1.3 handshakes/s, each with the proxy's CPU per request or
//!    handshake (see `support/tls_case.rs`).
//!
//! Every Harbor pick goes through its WebAssembly strategy (`round-robin`), as in production.
//! Every server binds 127.0.0.1 on a free port, is its own process group, dies with the bench
//! (`PR_SET_PDEATHSIG`) and is stopped by a drop guard, also on panic. A missing peer is
//! skipped with a printed reason; only a Harbor that does not work fails the run.
//!
//! Run with `cargo bench -p harbor --bench proxy` (about 10 minutes); `-- http`, `-- l4`,
//! `-- conns`, `-- idle` or `-- tls` runs one case. It is a benchmark, not a
//! test: a missed goal is reported, not a failure.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};

#[path = "support/machine.rs"]
mod machine;
#[path = "support/stats.rs"]
mod stats;
#[path = "support/tls_case.rs"]
mod tls_case;
use machine::{MAX_STOLEN_PCT, MachineTicks};

/// Measured runs per target; the tables show medians.
const RUNS: usize = 3;
/// Measured runs per target of the connection case: its runs are short, and a proxy's share of
/// the rate moves by several percent from run to run, more than the difference it measures.
const CONN_RUNS: usize = 10;
/// Length of one measured run in every case.
const RUN_SECS: u64 = 5;
/// A short unmeasured run per target first: pools fill, caches and JITs warm.
const WARMUP_SECS: u64 = 1;
/// Pause between runs, so one run's closing sockets do not land in the next.
const SETTLE: Duration = Duration::from_millis(500);

/// wrk's shape, the same for every target.
const WRK_THREADS: usize = 2;
const WRK_CONNECTIONS: usize = 64;

/// The connection-rate load generator: tasks in flight, bytes per connection.
const CONN_TASKS: usize = 32;
const PAYLOAD: &[u8; 16] = b"harbor-bench-16b";
/// One connection that takes longer than this counts as an error.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a server may take to answer after it starts (Harbor compiles its strategies).
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// Extra time a load tool gets beyond its own duration before it is killed.
const TOOL_SLACK: Duration = Duration::from_secs(20);
/// How long a stopped server gets between SIGTERM and SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// The virtual host of Harbor's HTTP route; sent to every target (the peers route everything).
const HOST: &str = "bench.localhost";
const BODY: &str = "ok\n";

fn main() -> anyhow::Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("harbor-proxy-bench-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let started = Instant::now();
    // Thousands of connections are held open at once; the servers started inherit the limit.
    if let Err(e) = harbor::descriptors::raise_limit() {
        println!("cannot raise the descriptor limit: {e}");
    }
    println!(
        "proxy benchmark: {} CPUs; load generators (wrk, iperf3, the connection generator) share \
         them with the proxies",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("work directory {}", dir.path().display());
    println!("load average at the start: {}", load_average());
    let result = run(dir.path());
    println!("total time {:.0} s", started.elapsed().as_secs_f64());
    if result.is_err() {
        // Keep the logs of the servers for a look at what went wrong.
        let kept = dir.keep();
        eprintln!("logs kept in {}", kept.display());
    }
    result
}

fn run(dir: &Path) -> anyhow::Result<()> {
    let ports = Ports::pick()?;
    let harbor_bin = PathBuf::from(env!("CARGO_BIN_EXE_harbor"));

    // Upstreams.
    let nginx = optional("nginx", || start_nginx(dir, ports.nginx));
    let iperf = optional("iperf3", || start_iperf_server(dir, ports.iperf));
    let echo = start_echo(dir, &harbor_bin, ports.echo)?;

    // Proxies: one process each, carrying every case it takes part in.
    let harbor = start_harbor(dir, &harbor_bin, &ports, iperf.is_some())?;
    // The same Harbor with every request through the full HTTP stack (hyper), for comparison.
    let harbor_full = if wanted("http") {
        Some(start_harbor_full(dir, &harbor_bin, &ports)?)
    } else {
        None
    };
    let haproxy = optional("haproxy", || start_haproxy(dir, &ports, iperf.is_some()));
    let caddy = optional("caddy", || start_caddy(dir, &ports));
    let envoy = optional("envoy", || start_envoy(dir, &ports, iperf.is_some()));

    let mut summary = Summary::default();

    // 1. Small HTTP.
    match (&nginx, find_program("wrk")) {
        _ if !wanted("http") => {}
        (Some(nginx), Some(_)) => {
            let mut targets = vec![Target::new("direct (nginx)", ports.nginx, nginx)];
            targets.push(Target::new("harbor", ports.harbor_http, &harbor));
            if let Some(p) = &harbor_full {
                targets.push(Target::new(
                    "harbor (hyper only)",
                    ports.harbor_full_http,
                    p,
                ));
            }
            if let Some(p) = &haproxy {
                targets.push(Target::new("haproxy", ports.haproxy_http, p));
            }
            if let Some(p) = &caddy {
                targets.push(Target::new("caddy", ports.caddy_http, p));
            }
            if let Some(p) = &envoy {
                targets.push(Target::new("envoy", ports.envoy_http, p));
            }
            let mut ready = Vec::new();
            for target in targets {
                match wait_http(target.proc, target.port) {
                    Ok(()) => ready.push(target),
                    Err(e) if target.name == "harbor" => return Err(e),
                    Err(e) => println!("skipped {} for HTTP: {e:#}", target.name),
                }
            }
            summary.http = Some(http_case(&ready, nginx)?);
        }
        (None, _) => println!("skipped the HTTP case: nginx (the upstream) did not start"),
        (_, None) => println!("skipped the HTTP case: wrk is not installed"),
    }

    // 2. One TCP stream.
    match &iperf {
        _ if !wanted("l4") => {}
        Some(iperf) => {
            let mut targets = vec![Target::new("direct (iperf3)", ports.iperf, iperf)];
            targets.push(Target::new("harbor", ports.harbor_iperf, &harbor));
            if let Some(p) = &haproxy {
                targets.push(Target::new("haproxy", ports.haproxy_iperf, p));
            }
            if let Some(p) = &envoy {
                targets.push(Target::new("envoy", ports.envoy_iperf, p));
            }
            let mut ready = Vec::new();
            for target in targets {
                match wait_listening(target.proc, target.port) {
                    Ok(()) => ready.push(target),
                    Err(e) if target.name == "harbor" => return Err(e),
                    Err(e) => println!("skipped {} for L4: {e:#}", target.name),
                }
            }
            summary.stream = Some(stream_case(&ready)?);
        }
        None => println!("skipped the L4 stream case: iperf3 did not start"),
    }

    // 3. New connections.
    if wanted("conns") {
        summary.conns = Some(conns_case(&ready_for_conns(
            &ports,
            &echo,
            &harbor,
            haproxy.as_ref(),
        )?)?);
    }

    // 4. Idle connections.
    if wanted("idle") {
        let peers = Peers {
            dir,
            harbor: &harbor_bin,
            ports: &ports,
            haproxy: haproxy.is_some(),
            http: nginx.is_some(),
        };
        summary.idle = Some(idle_case(&peers)?);
    }

    // 5. HTTPS.
    match (&nginx, find_program("wrk")) {
        _ if !wanted("tls") => {}
        (Some(_), Some(_)) => {
            summary.tls = tls_case::tls_case(dir, &harbor_bin, ports.nginx)?;
        }
        _ => println!("skipped the HTTPS case: it needs nginx and wrk"),
    }

    // Harbor must still be up: a crash mid-run would make its numbers meaningless. A peer that
    // died was already reported where it stopped answering.
    harbor.ensure_alive()?;
    println!("load average at the end: {}", load_average());
    summary.print();
    Ok(())
}

/// Whether the command line asks for `case` (no case named: every case).
fn wanted(case: &str) -> bool {
    let cases: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    cases.is_empty() || cases.iter().any(|c| c == case)
}

/// The targets of the new-connections case that answer.
fn ready_for_conns<'a>(
    ports: &Ports,
    echo: &'a Proc,
    harbor: &'a Proc,
    haproxy: Option<&'a Proc>,
) -> anyhow::Result<Vec<Target<'a>>> {
    let mut targets = vec![Target::new("direct (echo)", ports.echo, echo)];
    targets.push(Target::new("harbor", ports.harbor_echo, harbor));
    if let Some(p) = haproxy {
        targets.push(Target::new("haproxy", ports.haproxy_echo, p));
    }
    let mut ready = Vec::new();
    for target in targets {
        match wait_echo(target.proc, target.port) {
            Ok(()) => ready.push(target),
            Err(e) if target.name == "harbor" || target.name.starts_with("direct") => {
                return Err(e);
            }
            Err(e) => println!("skipped {} for new connections: {e:#}", target.name),
        }
    }
    Ok(ready)
}

/// Starts an optional server; a failure is printed and the server left out.
fn optional(name: &str, start: impl FnOnce() -> anyhow::Result<Proc>) -> Option<Proc> {
    if find_program(name).is_none() {
        println!("skipped {name}: not installed (not found on PATH)");
        return None;
    }
    match start() {
        Ok(p) => Some(p),
        Err(e) => {
            println!("skipped {name}: {e:#}");
            None
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Ports

/// Every port the run listens on, picked free at once so that no two are the same.
struct Ports {
    nginx: u16,
    iperf: u16,
    echo: u16,
    harbor_http: u16,
    harbor_iperf: u16,
    harbor_echo: u16,
    harbor_full_http: u16,
    haproxy_http: u16,
    haproxy_iperf: u16,
    haproxy_echo: u16,
    caddy_http: u16,
    envoy_http: u16,
    envoy_iperf: u16,
    envoy_admin: u16,
}

impl Ports {
    fn pick() -> anyhow::Result<Self> {
        // All held open together, then released together: distinct, and free a moment ago.
        let held: Vec<std::net::TcpListener> = (0..14)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()
            .context("cannot find free ports")?;
        let mut ports = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter();
        let mut next = || ports.next().expect("14 ports were picked");
        Ok(Self {
            nginx: next(),
            iperf: next(),
            echo: next(),
            harbor_http: next(),
            harbor_iperf: next(),
            harbor_echo: next(),
            harbor_full_http: next(),
            haproxy_http: next(),
            haproxy_iperf: next(),
            haproxy_echo: next(),
            caddy_http: next(),
            envoy_http: next(),
            envoy_iperf: next(),
            envoy_admin: next(),
        })
    }
}

/// The first three fields of /proc/loadavg: how busy the machine was besides this run.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
    )
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A server process in its own process group, stopped (group and all) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent. The bench
        // spawns only from its main thread, which lives as long as the process, so the signal
        // comes exactly when the bench dies (even by SIGKILL, when no drop guard runs).
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name} ({:?})", cmd.get_program()))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log,
        })
    }

    fn pid(&self) -> i32 {
        i32::try_from(self.child.id()).expect("pids fit an i32")
    }

    /// CPU time (user + system) used so far by the process and anything in its process group.
    fn cpu(&self) -> Duration {
        group_cpu(self.pid())
    }

    /// An error with the end of the log if the process has exited.
    fn ensure_alive(&self) -> anyhow::Result<()> {
        // `try_wait` needs `&mut`; /proc answers the same question without reaping.
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid()));
        let zombie = stat
            .as_deref()
            .ok()
            .and_then(|s| s.rsplit_once(')'))
            .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'));
        if zombie {
            bail!("{} exited; its log ends:\n{}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let group = -self.pid();
        // SAFETY: plain syscalls on a process group this bench created.
        unsafe { libc::kill(group, libc::SIGTERM) };
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (workers included) goes now.
        // SAFETY: a plain syscall on a process group this bench created.
        unsafe { libc::kill(group, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The path of `name` on PATH, if it is there and executable.
fn find_program(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// User + system CPU of every process whose process group is `pgid`.
fn group_cpu(pgid: i32) -> Duration {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let mut total = 0u64;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Duration::ZERO;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, pgrp, ... utime (14th field of
        // the line, 12th here), stime.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(2).and_then(|g| g.parse::<i32>().ok()) != Some(pgid) {
            continue;
        }
        let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
        total += field(11).unwrap_or(0) + field(12).unwrap_or(0);
    }
    Duration::from_secs_f64(total as f64 / ticks)
}

/// Runs a load tool to completion, killed if it overstays `limit`; returns its stdout.
fn run_tool(mut cmd: Command, limit: Duration, dir: &Path) -> anyhow::Result<String> {
    let out_path = dir.join("tool.out");
    let err_path = dir.join("tool.err");
    cmd.stdin(Stdio::null())
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?);
    let program = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start {program}"))?;
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{program} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = std::fs::read_to_string(&out_path)?;
    if !status.success() {
        let stderr = std::fs::read_to_string(&err_path)?;
        bail!(
            "{program} failed ({status}): {}{}",
            stderr.trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

// ---------------------------------------------------------------------------------------------
// Servers

fn start_nginx(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    let prefix = dir.join("nginx");
    std::fs::create_dir_all(prefix.join("tmp"))?;
    let p = prefix.display();
    // One process (no master): the same work as one worker, and nothing to orphan. Keep-alive
    // connections live long, so that no proxy pays for nginx closing them every 1,000 requests.
    let conf = format!(
        "daemon off;\n\
         master_process off;\n\
         worker_processes 1;\n\
         pid {p}/nginx.pid;\n\
         error_log {p}/error.log warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n\
         \x20 access_log off;\n\
         \x20 client_body_temp_path {p}/tmp/body;\n\
         \x20 proxy_temp_path {p}/tmp/proxy;\n\
         \x20 keepalive_requests 10000000;\n\
         \x20 server {{\n\
         \x20   listen 127.0.0.1:{port};\n\
         \x20   location / {{ return 200 \"ok\\n\"; }}\n\
         \x20 }}\n\
         }}\n"
    );
    let file = prefix.join("nginx.conf");
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new("nginx");
    cmd.arg("-c").arg(&file).arg("-p").arg(&prefix);
    Proc::spawn("nginx", cmd, dir)
}

fn start_iperf_server(dir: &Path, port: u16) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-B", "127.0.0.1", "-p", &port.to_string()]);
    Proc::spawn("iperf3-server", cmd, dir)
}

fn start_echo(dir: &Path, harbor: &Path, port: u16) -> anyhow::Result<Proc> {
    let mut cmd = Command::new(harbor);
    cmd.arg("echo")
        .arg("--listen")
        .arg(local(port).to_string())
        .env("RUST_LOG", "warn");
    Proc::spawn("echo", cmd, dir)
}

fn start_harbor(dir: &Path, harbor: &Path, ports: &Ports, iperf: bool) -> anyhow::Result<Proc> {
    start_harbor_as("harbor", dir, harbor, ports, iperf)
}

/// [`start_harbor`] as `name`, with routes and state of its own.
fn start_harbor_as(
    name: &str,
    dir: &Path,
    harbor: &Path,
    ports: &Ports,
    iperf: bool,
) -> anyhow::Result<Proc> {
    let tcp = |listen: u16, upstream: u16| {
        format!(
            "protocol = \"tcp\"\nlisten = \"{}\"\nupstreams = [\"{}\"]\nstrategy = \"round-robin\"\n",
            local(listen),
            local(upstream)
        )
    };
    let mut routes = vec![
        ("bench.route", http_route(ports)),
        ("echo.route", tcp(ports.harbor_echo, ports.echo)),
    ];
    if iperf {
        routes.push(("iperf.route", tcp(ports.harbor_iperf, ports.iperf)));
    }
    // iperf3's server closes its listener for a moment after every test: a connect refused
    // then would keep the only upstream out for the default 10 s cooldown, longer than the
    // client's retries wait. The peers here have no cooldown at all.
    let flags = ["--cooldown", "1s"];
    spawn_harbor(dir, harbor, name, &routes, ports.harbor_http, &flags)
}

/// A second Harbor carrying the HTTP route only, with `--no-direct-http1`.
fn start_harbor_full(dir: &Path, harbor: &Path, ports: &Ports) -> anyhow::Result<Proc> {
    let routes = [("bench.route", http_route(ports))];
    let flags = ["--no-direct-http1"];
    spawn_harbor(
        dir,
        harbor,
        "harbor-full",
        &routes,
        ports.harbor_full_http,
        &flags,
    )
}

fn http_route(ports: &Ports) -> String {
    format!(
        "host = \"{HOST}\"\nupstreams = [\"{}\"]\nstrategy = \"round-robin\"\n",
        local(ports.nginx)
    )
}

/// Starts `harbor` as `name` with `routes` (file name, text) in a routes directory of its own,
/// its HTTP proxy on `http_port`.
fn spawn_harbor(
    dir: &Path,
    harbor: &Path,
    name: &str,
    routes: &[(&str, String)],
    http_port: u16,
    flags: &[&str],
) -> anyhow::Result<Proc> {
    let routes_dir = dir.join(format!("{name}-routes"));
    let state = dir.join(format!("{name}-state"));
    std::fs::create_dir_all(&routes_dir)?;
    std::fs::create_dir_all(&state)?;
    for (file, text) in routes {
        std::fs::write(routes_dir.join(file), text)?;
    }
    let mut cmd = Command::new(harbor);
    cmd.arg("--routes")
        .arg(&routes_dir)
        .arg("--state-dir")
        .arg(&state)
        .args(["--api", "127.0.0.1:0"])
        .args(flags)
        .arg("--proxy-listen")
        .arg(local(http_port).to_string())
        .env("RUST_LOG", "warn");
    Proc::spawn(name, cmd, dir)
}

/// The header work Harbor does on every request and response (`X-Forwarded-*`, `Via` both
/// ways), so that both proxies send nginx the same request and wrk the same response.
const HAPROXY_HEADERS: &str = "  option forwardfor\n\
     \x20 http-request set-header X-Forwarded-Proto http\n\
     \x20 http-request set-header X-Forwarded-Host %[req.hdr(host)]\n\
     \x20 http-request add-header Via \"1.1 haproxy\"\n\
     \x20 http-response add-header Via \"1.1 haproxy\"\n";

fn start_haproxy(dir: &Path, ports: &Ports, iperf: bool) -> anyhow::Result<Proc> {
    let mut conf = String::from(
        "global\n  nbthread 2\n  maxconn 8000\n\
         defaults\n  timeout connect 3s\n  timeout client 60s\n  timeout server 60s\n",
    );
    let mut section = |name: &str, mode: &str, listen: u16, upstream: u16, extra: &str| {
        write!(
            conf,
            "frontend {name}_in\n  mode {mode}\n  bind {}\n  default_backend {name}\n\
             backend {name}\n  mode {mode}\n  server s1 {}\n{extra}",
            local(listen),
            local(upstream)
        )
        .expect("writing to a String");
    };
    section(
        "http",
        "http",
        ports.haproxy_http,
        ports.nginx,
        HAPROXY_HEADERS,
    );
    section("echo", "tcp", ports.haproxy_echo, ports.echo, "");
    if iperf {
        section("iperf", "tcp", ports.haproxy_iperf, ports.iperf, "");
    }
    let file = dir.join("haproxy.cfg");
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&file);
    Proc::spawn("haproxy", cmd, dir)
}

fn start_caddy(dir: &Path, ports: &Ports) -> anyhow::Result<Proc> {
    let config = serde_json::json!({
        "admin": { "disabled": true },
        "logging": { "logs": { "default": { "level": "ERROR" } } },
        "apps": { "http": { "servers": { "bench": {
            "listen": [local(ports.caddy_http).to_string()],
            "automatic_https": { "disable": true },
            "routes": [ { "handle": [ {
                "handler": "reverse_proxy",
                "upstreams": [ { "dial": local(ports.nginx).to_string() } ]
            } ] } ]
        } } } }
    });
    spawn_caddy(dir, "caddy", &config)
}

/// Caddy running `config`, written as `<name>.json` in `dir`.
fn spawn_caddy(dir: &Path, name: &str, config: &serde_json::Value) -> anyhow::Result<Proc> {
    let file = dir.join(format!("{name}.json"));
    std::fs::write(&file, serde_json::to_vec_pretty(config)?)?;
    // Caddy autosaves its config and keeps state under the XDG directories: keep both in here.
    let home = dir.join(format!("{name}-home"));
    std::fs::create_dir_all(&home)?;
    let mut cmd = Command::new("caddy");
    cmd.arg("run")
        .arg("--config")
        .arg(&file)
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("XDG_DATA_HOME", home.join("data"));
    Proc::spawn(name, cmd, dir)
}

/// The filter of an Envoy listener that proxies every HTTP request to the `nginx` cluster, as
/// YAML at the indentation of a listener's filter chain; stats under `stat_prefix`.
fn envoy_to_nginx(stat_prefix: &str) -> String {
    format!(
        "      - name: envoy.filters.network.http_connection_manager\n\
         \x20       typed_config:\n\
         \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n\
         \x20         stat_prefix: {stat_prefix}\n          codec_type: AUTO\n          route_config:\n\
         \x20           name: local\n            virtual_hosts:\n            - name: all\n\
         \x20             domains: [\"*\"]\n              routes:\n\
         \x20             - match: {{ prefix: \"/\" }}\n                route: {{ cluster: nginx }}\n\
         \x20         http_filters:\n          - name: envoy.filters.http.router\n\
         \x20           typed_config:\n\
         \x20             \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router\n"
    )
}

fn start_envoy(dir: &Path, ports: &Ports, iperf: bool) -> anyhow::Result<Proc> {
    let cluster = |name: &str, port: u16| {
        format!(
            "  - name: {name}\n    type: STATIC\n    connect_timeout: 3s\n    load_assignment:\n\
             \x20     cluster_name: {name}\n      endpoints:\n      - lb_endpoints:\n\
             \x20       - endpoint:\n            address:\n              socket_address: \
             {{ address: 127.0.0.1, port_value: {port} }}\n"
        )
    };
    let mut yaml = format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}\n\
         static_resources:\n  listeners:\n\
         \x20 - name: http\n    address:\n      socket_address: {{ address: 127.0.0.1, port_value: {http} }}\n\
         \x20   filter_chains:\n    - filters:\n{hcm}",
        admin = ports.envoy_admin,
        http = ports.envoy_http,
        hcm = envoy_to_nginx("http"),
    );
    if iperf {
        write!(
            yaml,
            "  - name: iperf\n    address:\n      socket_address: {{ address: 127.0.0.1, port_value: {} }}\n\
             \x20   filter_chains:\n    - filters:\n      - name: envoy.filters.network.tcp_proxy\n\
             \x20       typed_config:\n\
             \x20         \"@type\": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy\n\
             \x20         stat_prefix: iperf\n          cluster: iperf\n",
            ports.envoy_iperf
        )?;
    }
    yaml.push_str("  clusters:\n");
    yaml.push_str(&cluster("nginx", ports.nginx));
    if iperf {
        yaml.push_str(&cluster("iperf", ports.iperf));
    }
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, yaml)?;
    let mut cmd = Command::new("envoy");
    cmd.arg("-c")
        .arg(&file)
        .args(["--concurrency", "2", "--log-level", "warn"])
        .arg("--disable-hot-restart");
    Proc::spawn("envoy", cmd, dir)
}

// ---------------------------------------------------------------------------------------------
// Readiness: poll with a deadline, never a fixed sleep.

fn wait_until(proc: &Proc, what: &str, mut probe: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        if probe() {
            return Ok(());
        }
        proc.ensure_alive()?;
        if Instant::now() >= deadline {
            bail!(
                "{} did not {what} within {READY_TIMEOUT:?}; its log ends:\n{}",
                proc.name,
                proc.log_tail()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_http(proc: &Proc, port: u16) -> anyhow::Result<()> {
    wait_until(proc, &format!("answer 200 {BODY:?} on port {port}"), || {
        http_get(port).is_ok_and(|r| r.starts_with("HTTP/1.1 200") && r.ends_with(BODY))
    })
}

fn wait_listening(proc: &Proc, port: u16) -> anyhow::Result<()> {
    wait_until(proc, &format!("accept on port {port}"), || {
        TcpStream::connect_timeout(&local(port), Duration::from_secs(1)).is_ok()
    })
}

fn wait_echo(proc: &Proc, port: u16) -> anyhow::Result<()> {
    wait_until(proc, &format!("echo on port {port}"), || {
        echo_once(port).is_ok()
    })
}

/// One `GET /` with `Connection: close`; the whole response.
fn http_get(port: u16) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&local(port), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

fn echo_once(port: u16) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&local(port), Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(PAYLOAD)?;
    let mut back = [0u8; PAYLOAD.len()];
    stream.read_exact(&mut back)?;
    if &back != PAYLOAD {
        return Err(std::io::Error::other("echoed bytes differ"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Measurement helpers

/// A target of one case: where to send load, and whose CPU to charge for it.
struct Target<'a> {
    name: &'static str,
    port: u16,
    proc: &'a Proc,
}

impl<'a> Target<'a> {
    fn new(name: &'static str, port: u16, proc: &'a Proc) -> Self {
        Self { name, port, proc }
    }
}

fn median(values: impl IntoIterator<Item = f64>) -> f64 {
    stats::median(values).unwrap_or(f64::NAN)
}

/// Runs `measure` on every target `runs` times, round by round, after one warm-up each. Each
/// round starts one target further along, so that no target always runs right after the same
/// one (a run leaves closing sockets and warm caches behind for the next). Gives each target's
/// runs in round order, each with whether it was calm (little stolen).
fn rounds<T>(
    targets: &[Target<'_>],
    runs: usize,
    mut warm: impl FnMut(&Target<'_>) -> anyhow::Result<()>,
    mut measure: impl FnMut(&Target<'_>) -> anyhow::Result<T>,
    describe: impl Fn(&T) -> String,
) -> anyhow::Result<Vec<Vec<(T, bool)>>> {
    for target in targets {
        warm(target).with_context(|| format!("warming up {}", target.name))?;
        std::thread::sleep(SETTLE);
    }
    let mut results: Vec<Vec<(T, bool)>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 1..=runs {
        for k in 0..targets.len() {
            let i = (k + round - 1) % targets.len();
            let (target, done) = (&targets[i], &mut results[i]);
            let before = MachineTicks::now();
            let result = measure(target).with_context(|| format!("measuring {}", target.name))?;
            let stolen = before
                .zip(MachineTicks::now())
                .map_or(0.0, |(b, a)| a.steal_pct_since(&b));
            let calm = stolen < MAX_STOLEN_PCT;
            println!(
                "  run {round}/{runs} {:<20} {}  stolen {stolen:.0} %{}",
                target.name,
                describe(&result),
                if calm { "" } else { " (left out)" }
            );
            done.push((result, calm));
            std::thread::sleep(SETTLE);
        }
    }
    Ok(results)
}

/// One summary row per target, made by `row` from the target's name and the runs that count.
fn rows<T, R>(
    targets: &[Target<'_>],
    results: &[Vec<(T, bool)>],
    row: impl Fn(&'static str, &[&T]) -> R,
) -> Vec<R> {
    targets
        .iter()
        .zip(results)
        .map(|(t, runs)| row(t.name, &kept(t, runs)))
        .collect()
}

/// The runs of `target` that count for its medians: the calm ones. A run the hypervisor starved
/// measured the neighbours; a target left with no calm run keeps all of its runs, and says so.
fn kept<'r, T>(target: &Target<'_>, runs: &'r [(T, bool)]) -> Vec<&'r T> {
    if runs.iter().any(|(_, calm)| *calm) {
        runs.iter()
            .filter_map(|(r, calm)| calm.then_some(r))
            .collect()
    } else {
        println!(
            "  {}: every run lost {MAX_STOLEN_PCT:.0} % or more of the machine to the hypervisor; its medians include them",
            target.name
        );
        runs.iter().map(|(r, _)| r).collect()
    }
}

fn ratio(value: f64, base: Option<f64>) -> String {
    match base {
        Some(b) if b > 0.0 && value.is_finite() => format!("{:.0} %", 100.0 * value / b),
        _ => "-".into(),
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Small HTTP

struct WrkRun {
    requests: u64,
    rps: f64,
    p99_ms: f64,
    errors: u64,
    cpu_us_per_req: f64,
    /// The upstream's CPU per request: a proxy that costs the upstream more (more reads,
    /// more connections) lowers everyone's throughput on a shared machine.
    upstream_us_per_req: f64,
    /// How much of the machine's CPU time went unused during the run.
    idle_pct: f64,
}

struct HttpRow {
    name: &'static str,
    rps: f64,
    p99_ms: f64,
    cpu_us: f64,
    upstream_us: f64,
    idle_pct: f64,
    errors: u64,
}

fn http_case(targets: &[Target<'_>], upstream: &Proc) -> anyhow::Result<Vec<HttpRow>> {
    println!();
    println!(
        "HTTP: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{RUN_SECS}s --latency, Host: {HOST}, \
         nginx answering {BODY:?}; CPU is the proxy's (nginx's own for direct), then nginx's, \
         and the machine's idle share"
    );
    let scratch = tempfile::tempdir()?;
    let results = rounds(
        targets,
        RUNS,
        |t| wrk(t, upstream, WARMUP_SECS, scratch.path()).map(drop),
        |t| wrk(t, upstream, RUN_SECS, scratch.path()),
        |r| {
            format!(
                "{:>9.0} req/s  p99 {:>6.2} ms  {:>6.1} µs CPU/req  nginx {:>4.1} µs/req  idle {:>3.0} %  errors {}",
                r.rps, r.p99_ms, r.cpu_us_per_req, r.upstream_us_per_req, r.idle_pct, r.errors
            )
        },
    )?;
    Ok(rows(targets, &results, |name, runs| HttpRow {
        name,
        rps: median(runs.iter().map(|r| r.rps)),
        p99_ms: median(runs.iter().map(|r| r.p99_ms)),
        cpu_us: median(runs.iter().map(|r| r.cpu_us_per_req)),
        upstream_us: median(runs.iter().map(|r| r.upstream_us_per_req)),
        idle_pct: median(runs.iter().map(|r| r.idle_pct)),
        errors: runs.iter().map(|r| r.errors).sum(),
    }))
}

fn wrk(target: &Target<'_>, upstream: &Proc, secs: u64, scratch: &Path) -> anyhow::Result<WrkRun> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{WRK_CONNECTIONS}"))
        .arg(format!("-d{secs}s"))
        .args(["--latency", "--timeout", "2s", "-H"])
        .arg(format!("Host: {HOST}"))
        .arg(format!("http://{}/", local(target.port)));
    let (cpu_before, upstream_before, machine_before) =
        (target.proc.cpu(), upstream.cpu(), MachineTicks::now());
    let out = run_tool(cmd, Duration::from_secs(secs) + TOOL_SLACK, scratch)?;
    let cpu = target.proc.cpu().saturating_sub(cpu_before);
    let upstream_cpu = upstream.cpu().saturating_sub(upstream_before);
    let mut run = parse_wrk(&out).with_context(|| format!("cannot read wrk's output:\n{out}"))?;
    let per_request = |cpu: Duration| cpu.as_secs_f64() * 1e6 / run.requests.max(1) as f64;
    run.cpu_us_per_req = per_request(cpu);
    run.upstream_us_per_req = per_request(upstream_cpu);
    run.idle_pct = machine_before
        .zip(MachineTicks::now())
        .map_or(f64::NAN, |(b, a)| a.idle_pct_since(&b));
    Ok(run)
}

fn parse_wrk(out: &str) -> anyhow::Result<WrkRun> {
    let mut run = WrkRun {
        requests: 0,
        rps: f64::NAN,
        p99_ms: f64::NAN,
        errors: 0,
        cpu_us_per_req: f64::NAN,
        upstream_us_per_req: f64::NAN,
        idle_pct: f64::NAN,
    };
    for line in out.lines().map(str::trim) {
        if let Some(v) = line.strip_prefix("Requests/sec:") {
            run.rps = v.trim().parse()?;
        } else if let Some(v) = line.strip_prefix("99%") {
            run.p99_ms = parse_wrk_duration_ms(v.trim())?;
        } else if line.contains(" requests in ") {
            run.requests = line
                .split_whitespace()
                .next()
                .context("no request count")?
                .parse()?;
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            run.errors += v.trim().parse::<u64>()?;
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            for part in v.split(',') {
                if let Some(n) = part.split_whitespace().nth(1) {
                    run.errors += n.parse::<u64>()?;
                }
            }
        }
    }
    ensure!(
        run.rps.is_finite() && run.p99_ms.is_finite(),
        "no Requests/sec or 99% line"
    );
    Ok(run)
}

/// wrk prints durations as `812.00us`, `1.23ms`, `1.05s` or `1.02m`.
fn parse_wrk_duration_ms(text: &str) -> anyhow::Result<f64> {
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {text:?}"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        _ => bail!("unknown unit in {text:?}"),
    };
    Ok(number * factor)
}

// ---------------------------------------------------------------------------------------------
// 2. One TCP stream

struct StreamRun {
    gbps: f64,
    cpu_cores: f64,
}

struct StreamRow {
    name: &'static str,
    gbps: f64,
    cpu_cores: f64,
}

fn stream_case(targets: &[Target<'_>]) -> anyhow::Result<Vec<StreamRow>> {
    println!();
    println!(
        "L4, one TCP stream: iperf3 -c 127.0.0.1 -t {RUN_SECS}; CPU is the proxy's in cores busy \
         (iperf3's server for direct)"
    );
    let scratch = tempfile::tempdir()?;
    let results = rounds(
        targets,
        RUNS,
        |t| iperf(t, WARMUP_SECS, scratch.path()).map(drop),
        |t| iperf(t, RUN_SECS, scratch.path()),
        |r| format!("{:>6.2} Gbit/s  {:.2} cores", r.gbps, r.cpu_cores),
    )?;
    Ok(rows(targets, &results, |name, runs| StreamRow {
        name,
        gbps: median(runs.iter().map(|r| r.gbps)),
        cpu_cores: median(runs.iter().map(|r| r.cpu_cores)),
    }))
}

fn iperf(target: &Target<'_>, secs: u64, scratch: &Path) -> anyhow::Result<StreamRun> {
    // The server takes one test at a time; right after a test through a proxy it can still be
    // finishing the last one ("the server is busy"), so a few tries.
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut cmd = Command::new("iperf3");
        cmd.args(["-c", "127.0.0.1", "-p", &target.port.to_string()])
            .args(["-t", &secs.to_string(), "-J"]);
        let cpu_before = target.proc.cpu();
        let started = Instant::now();
        let result = run_tool(cmd, Duration::from_secs(secs) + TOOL_SLACK, scratch)
            .and_then(|out| parse_iperf(&out));
        let wall = started.elapsed();
        let cpu = target.proc.cpu().saturating_sub(cpu_before);
        match result {
            Ok(gbps) => {
                return Ok(StreamRun {
                    gbps,
                    cpu_cores: cpu.as_secs_f64() / wall.as_secs_f64(),
                });
            }
            Err(e) if attempt < 5 => {
                println!("  iperf3 through {} failed, retrying: {e:#}", target.name);
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(e),
        }
    }
}

fn parse_iperf(out: &str) -> anyhow::Result<f64> {
    let json: serde_json::Value = serde_json::from_str(out).context("iperf3 did not print JSON")?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let bps = json["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .context("no end.sum_received.bits_per_second in iperf3's JSON")?;
    Ok(bps / 1e9)
}

// ---------------------------------------------------------------------------------------------
// 3. New connections

struct ConnRun {
    ok: u64,
    errors: u64,
    per_sec: f64,
    p99_ms: f64,
    cpu_us_per_conn: f64,
    idle_pct: f64,
}

struct ConnRow {
    name: &'static str,
    per_sec: f64,
    p99_ms: f64,
    cpu_us: f64,
    errors: u64,
}

fn conns_case(targets: &[Target<'_>]) -> anyhow::Result<Conns> {
    println!();
    println!(
        "New TCP connections: {CONN_TASKS} tasks in this process, each connect → write {} bytes \
         → read them back → close, for {RUN_SECS} s; `harbor echo` upstream. The generator runs \
         on the same cores as the proxy. CPU is the proxy's (the echo server's for direct)",
        PAYLOAD.len()
    );
    // The generator's own runtime, two workers: as many as the machine has cores.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot build the tokio runtime")?;
    let results = rounds(
        targets,
        CONN_RUNS,
        |t| connect_load(&runtime, t, WARMUP_SECS).map(drop),
        |t| connect_load(&runtime, t, RUN_SECS),
        |r| {
            format!(
                "{:>8.0} conn/s  p99 {:>6.2} ms  {:>6.1} µs CPU/conn  idle {:>3.0} %  ok {}  errors {}",
                r.per_sec, r.p99_ms, r.cpu_us_per_conn, r.idle_pct, r.ok, r.errors
            )
        },
    )?;
    let runs_of = |name: &str| {
        targets
            .iter()
            .position(|t| t.name == name)
            .map(|i| &results[i])
    };
    let paired = runs_of("harbor")
        .zip(runs_of("haproxy"))
        .and_then(|(h, p)| Paired::of(h, p));
    let rows = rows(targets, &results, |name, runs| ConnRow {
        name,
        per_sec: median(runs.iter().map(|r| r.per_sec)),
        p99_ms: median(runs.iter().map(|r| r.p99_ms)),
        cpu_us: median(runs.iter().map(|r| r.cpu_us_per_conn)),
        errors: runs.iter().map(|r| r.errors).sum(),
    });
    Ok(Conns { rows, paired })
}

struct Conns {
    rows: Vec<ConnRow>,
    paired: Option<Paired>,
}

/// Harbor against HAProxy round by round: two runs of one round ran a few seconds apart, so
/// their ratio is spared the drift between rounds that moves both proxies alike.
struct Paired {
    /// Calm rounds (neither run starved by the hypervisor).
    rounds: usize,
    /// Quartiles of Harbor's rate over HAProxy's.
    rate: [f64; 3],
    /// Quartiles of Harbor's CPU per connection over HAProxy's.
    cpu: [f64; 3],
}

impl Paired {
    fn of(harbor: &[(ConnRun, bool)], haproxy: &[(ConnRun, bool)]) -> Option<Self> {
        let pairs: Vec<(&ConnRun, &ConnRun)> = harbor
            .iter()
            .zip(haproxy)
            .filter(|((_, h_calm), (_, p_calm))| *h_calm && *p_calm)
            .map(|((h, _), (p, _))| (h, p))
            .collect();
        Some(Self {
            rounds: pairs.len(),
            rate: stats::quartiles(pairs.iter().map(|(h, p)| h.per_sec / p.per_sec))?,
            cpu: stats::quartiles(
                pairs
                    .iter()
                    .map(|(h, p)| h.cpu_us_per_conn / p.cpu_us_per_conn),
            )?,
        })
    }
}

fn connect_load(
    runtime: &tokio::runtime::Runtime,
    target: &Target<'_>,
    secs: u64,
) -> anyhow::Result<ConnRun> {
    let addr = local(target.port);
    let (cpu_before, machine_before) = (target.proc.cpu(), MachineTicks::now());
    let started = Instant::now();
    let per_task = runtime.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> = (0..CONN_TASKS)
            .map(|_| tokio::spawn(connect_loop(addr, stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(secs)).await;
        stop.store(true, Ordering::Relaxed);
        let mut out = Vec::with_capacity(tasks.len());
        for task in tasks {
            out.push(task.await.context("a load task panicked")?);
        }
        anyhow::Ok(out)
    })?;
    let elapsed = started.elapsed();
    let cpu = target.proc.cpu().saturating_sub(cpu_before);
    // Idle cores under a load that should fill them point at a proxy that leaves work waiting
    // (a lane asleep while its connections queue), not at its cost.
    let idle_pct = machine_before
        .zip(MachineTicks::now())
        .map_or(f64::NAN, |(b, a)| a.idle_pct_since(&b));
    let mut latencies: Vec<u32> = Vec::new();
    let (mut ok, mut errors) = (0u64, 0u64);
    for (lat, errs) in per_task {
        ok += lat.len() as u64;
        errors += errs;
        latencies.extend(lat);
    }
    ensure!(ok > 0, "no connection completed ({errors} errors)");
    latencies.sort_unstable();
    let p99 =
        latencies[((latencies.len() as f64 * 0.99).ceil() as usize).clamp(1, latencies.len()) - 1];
    Ok(ConnRun {
        ok,
        errors,
        per_sec: ok as f64 / elapsed.as_secs_f64(),
        p99_ms: f64::from(p99) / 1e3,
        cpu_us_per_conn: cpu.as_secs_f64() * 1e6 / ok as f64,
        idle_pct,
    })
}

/// Connections one after another until `stop`: the microseconds each took, and the failures.
async fn connect_loop(addr: SocketAddr, stop: Arc<AtomicBool>) -> (Vec<u32>, u64) {
    let mut latencies = Vec::with_capacity(64 * 1024);
    let mut errors = 0;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match tokio::time::timeout(CONN_TIMEOUT, one_connection(addr)).await {
            Ok(Ok(())) => {
                latencies.push(started.elapsed().as_micros().min(u128::from(u32::MAX)) as u32)
            }
            _ => {
                errors += 1;
                // An error is usually immediate (refused, out of ports): do not spin on it.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    (latencies, errors)
}

async fn one_connection(addr: SocketAddr) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(PAYLOAD).await?;
    let mut back = [0u8; PAYLOAD.len()];
    stream.read_exact(&mut back).await?;
    if &back != PAYLOAD {
        return Err(std::io::Error::other("echoed bytes differ"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Summary

#[derive(Default)]
struct Summary {
    http: Option<Vec<HttpRow>>,
    stream: Option<Vec<StreamRow>>,
    conns: Option<Conns>,
    idle: Option<Vec<IdleRow>>,
    /// The HTTPS case prints its own table; these are its goal lines.
    tls: Vec<String>,
}

fn find<'a, R>(rows: &'a [R], name: impl Fn(&R) -> &str, wanted: &str) -> Option<&'a R> {
    rows.iter().find(|r| name(r).starts_with(wanted))
}

impl Summary {
    fn print(&self) {
        println!();
        println!(
            "summary: medians of up to {RUNS} runs of {RUN_SECS} s each ({CONN_RUNS} for new \
             connections; runs with {MAX_STOLEN_PCT:.0} % or more stolen left out)"
        );
        let mut goals = Vec::new();

        if let Some(rows) = &self.http {
            let direct = find(rows, |r| r.name, "direct").map(|r| r.rps);
            let haproxy = find(rows, |r| r.name, "haproxy").map(|r| r.rps);
            println!();
            println!(
                "{:<20} {:>9} {:>9} {:>10} {:>11} {:>12} {:>13} {:>7} {:>7}",
                "HTTP",
                "req/s",
                "p99 ms",
                "vs direct",
                "vs haproxy",
                "CPU µs/req",
                "nginx µs/req",
                "idle %",
                "errors"
            );
            for r in rows {
                println!(
                    "{:<20} {:>9.0} {:>9.2} {:>10} {:>11} {:>12.1} {:>13.1} {:>7.0} {:>7}",
                    r.name,
                    r.rps,
                    r.p99_ms,
                    ratio(r.rps, direct),
                    ratio(r.rps, haproxy),
                    r.cpu_us,
                    r.upstream_us,
                    r.idle_pct,
                    r.errors
                );
            }
            let harbor = find(rows, |r| r.name, "harbor");
            let haproxy = find(rows, |r| r.name, "haproxy");
            goals.push(match (harbor, haproxy) {
                (Some(h), Some(p)) => {
                    let met = h.rps >= p.rps && h.p99_ms <= p.p99_ms;
                    format!(
                        "HTTP req/s >= HAProxy's with p99 no worse: harbor {:.0} req/s p99 {:.2} ms, \
                         haproxy {:.0} req/s p99 {:.2} ms ({})",
                        h.rps,
                        h.p99_ms,
                        p.rps,
                        p.p99_ms,
                        verdict(met)
                    )
                }
                _ => "HTTP req/s >= HAProxy's: not measured (HAProxy missing)".into(),
            });
        }

        if let Some(rows) = &self.stream {
            let direct = find(rows, |r| r.name, "direct").map(|r| r.gbps);
            println!();
            println!(
                "{:<16} {:>9} {:>10} {:>12}",
                "L4 one stream", "Gbit/s", "vs direct", "CPU cores"
            );
            for r in rows {
                println!(
                    "{:<16} {:>9.2} {:>10} {:>12.2}",
                    r.name,
                    r.gbps,
                    ratio(r.gbps, direct),
                    r.cpu_cores
                );
            }
            let harbor = find(rows, |r| r.name, "harbor");
            let envoy = find(rows, |r| r.name, "envoy");
            goals.push(match (harbor, envoy, direct) {
                (Some(h), Some(e), Some(d)) => format!(
                    "L4 throughput >= Envoy's share of direct: harbor {}, envoy {} ({})",
                    ratio(h.gbps, Some(d)),
                    ratio(e.gbps, Some(d)),
                    verdict(h.gbps >= e.gbps)
                ),
                (Some(h), None, Some(d)) => format!(
                    "L4 throughput >= Envoy's share of direct (~58 % in the field notes): harbor {} \
                     ({}; Envoy not measured here)",
                    ratio(h.gbps, Some(d)),
                    verdict(h.gbps >= 0.58 * d)
                ),
                _ => "L4 throughput: not measured".into(),
            });
        }

        if let Some(Conns { rows, paired }) = &self.conns {
            let haproxy = find(rows, |r| r.name, "haproxy").map(|r| r.per_sec);
            let direct = find(rows, |r| r.name, "direct").map(|r| r.per_sec);
            println!();
            println!(
                "{:<16} {:>9} {:>9} {:>10} {:>11} {:>13} {:>7}",
                "new TCP conns",
                "conn/s",
                "p99 ms",
                "vs direct",
                "vs haproxy",
                "CPU µs/conn",
                "errors"
            );
            for r in rows {
                println!(
                    "{:<16} {:>9.0} {:>9.2} {:>10} {:>11} {:>13.1} {:>7}",
                    r.name,
                    r.per_sec,
                    r.p99_ms,
                    ratio(r.per_sec, direct),
                    ratio(r.per_sec, haproxy),
                    r.cpu_us,
                    r.errors
                );
            }
            println!(
                "(the connection generator, {CONN_TASKS} tokio tasks in the bench process, shares \
                 the same cores)"
            );
            let pct = |[low, mid, high]: [f64; 3]| {
                format!(
                    "{:.1} % ({:.0}–{:.0} %)",
                    100.0 * mid,
                    100.0 * low,
                    100.0 * high
                )
            };
            goals.push(match paired {
                Some(p) => {
                    println!(
                        "harbor over haproxy in the same round, median (quartiles) of {} calm rounds: \
                         rate {}, CPU per connection {}",
                        p.rounds,
                        pct(p.rate),
                        pct(p.cpu)
                    );
                    format!(
                        "new connections/s >= HAProxy's: harbor at {} of haproxy's rate, round by \
                         round ({})",
                        pct(p.rate),
                        verdict(p.rate[1] >= 1.0)
                    )
                }
                None => "new connections/s >= HAProxy's: not measured (HAProxy missing)".into(),
            });
        }

        if let Some(rows) = &self.idle {
            println!();
            println!(
                "{:<28} {:>16} {:>12}",
                "Idle connections", "RSS per 1,000", "vs haproxy"
            );
            for row in rows {
                let haproxy = rows
                    .iter()
                    .find(|r| r.kind == row.kind && r.name == "haproxy")
                    .map(|r| r.kib_per_thousand);
                println!(
                    "{:<28} {:>12.0} KiB {:>12}",
                    format!("{} ({})", row.name, row.kind),
                    row.kib_per_thousand,
                    ratio(row.kib_per_thousand, haproxy)
                );
            }
            if let Some(heads) = rows.iter().find(|r| r.kind == "unfinished head") {
                goals.push(format!(
                    "1,000 unfinished heads cost at most about 100 MiB: harbor {:.0} MiB ({})",
                    heads.kib_per_thousand / 1024.0,
                    verdict(heads.kib_per_thousand <= 100.0 * 1024.0)
                ));
            }
            for kind in ["http", "tcp"] {
                if let Some(harbor) = rows.iter().find(|r| r.kind == kind && r.name == "harbor") {
                    goals.push(format!(
                        "idle {kind} connections cost <= 4 KiB each: harbor {:.1} KiB ({})",
                        harbor.kib_per_thousand / 1000.0,
                        verdict(harbor.kib_per_thousand <= 4000.0)
                    ));
                }
            }
        }

        goals.extend(self.tls.iter().cloned());
        println!();
        for goal in goals {
            println!("goal: {goal}");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Idle connections

/// Connections opened and left idle per measurement.
const IDLE_CONNECTIONS: usize = 1000;
/// Measurements per target; the table shows the median.
const IDLE_RUNS: usize = 3;

/// What the idle case starts afresh for each measurement: an allocator keeps what it was
/// given, so a second measurement in the same process mostly reuses the first one's memory.
struct Peers<'a> {
    dir: &'a Path,
    harbor: &'a Path,
    /// The upstreams' ports; the proxies get fresh ones each time.
    ports: &'a Ports,
    haproxy: bool,
    /// Whether nginx, the HTTP upstream, runs.
    http: bool,
}

impl Peers<'_> {
    /// A fresh `proxy` ("harbor" or "haproxy") and its ports.
    fn start(&self, proxy: &str) -> anyhow::Result<(Proc, Ports)> {
        let fresh = Ports::pick()?;
        let ports = Ports {
            nginx: self.ports.nginx,
            echo: self.ports.echo,
            iperf: self.ports.iperf,
            ..fresh
        };
        let proc = match proxy {
            "harbor" => start_harbor_as("harbor-idle", self.dir, self.harbor, &ports, false)?,
            _ => start_haproxy(self.dir, &ports, false)?,
        };
        Ok((proc, ports))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    /// A keep-alive HTTP connection after one request.
    Http,
    /// A tcp route's connection after 16 bytes echoed.
    Tcp,
    /// An HTTP connection holding an unfinished 60,000-byte head.
    Head,
}

impl Idle {
    fn name(self) -> &'static str {
        match self {
            Idle::Http => "http",
            Idle::Tcp => "tcp",
            Idle::Head => "unfinished head",
        }
    }

    fn port(self, proxy: &str, ports: &Ports) -> u16 {
        match (self, proxy) {
            (Idle::Tcp, "harbor") => ports.harbor_echo,
            (Idle::Tcp, _) => ports.haproxy_echo,
            (_, "harbor") => ports.harbor_http,
            _ => ports.haproxy_http,
        }
    }

    /// One connection, used once and left open.
    fn open(self, port: u16) -> anyhow::Result<TcpStream> {
        let mut conn = TcpStream::connect(local(port))?;
        conn.set_read_timeout(Some(CONN_TIMEOUT))?;
        match self {
            Idle::Head => {
                write!(conn, "GET / HTTP/1.1\r\nHost: {HOST}\r\nX-Fill: ")?;
                conn.write_all(&[b'a'; 60_000])?;
            }
            Idle::Http => {
                write!(conn, "GET / HTTP/1.1\r\nHost: {HOST}\r\n\r\n")?;
                let mut got = Vec::new();
                let mut buf = [0u8; 1024];
                while !got.ends_with(BODY.as_bytes()) {
                    let n = conn.read(&mut buf)?;
                    ensure!(n > 0, "closed before answering");
                    got.extend_from_slice(&buf[..n]);
                }
            }
            Idle::Tcp => {
                conn.write_all(PAYLOAD)?;
                let mut back = [0u8; PAYLOAD.len()];
                conn.read_exact(&mut back)?;
            }
        }
        Ok(conn)
    }
}

struct IdleRow {
    name: &'static str,
    kind: &'static str,
    kib_per_thousand: f64,
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: i32) -> anyhow::Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("no VmRSS value")?
        .parse()?;
    Ok(kib)
}

/// The resident memory of `pid` once it holds still: a proxy just started may still be freeing
/// what it used to start (Harbor compiling its strategies, when its cache is cold).
fn settled_rss_kib(pid: i32) -> anyhow::Result<f64> {
    let mut last = rss_kib(pid)?;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(250));
        let now = rss_kib(pid)?;
        if (now - last).abs() < 64.0 {
            return Ok(now);
        }
        last = now;
    }
    Ok(last)
}

/// One measurement in a fresh `proxy`: its memory's growth per 1,000 `kind` connections.
fn idle_once(peers: &Peers<'_>, proxy: &str, kind: Idle) -> anyhow::Result<f64> {
    let (proc, ports) = peers.start(proxy)?;
    let port = kind.port(proxy, &ports);
    match kind {
        Idle::Tcp => wait_echo(&proc, port)?,
        _ => wait_http(&proc, port)?,
    }
    // Warm: threads, pools and first buffers as after a little real work.
    let warm = if kind == Idle::Tcp {
        Idle::Tcp
    } else {
        Idle::Http
    };
    for _ in 0..16 {
        drop(warm.open(port)?);
    }
    let before = settled_rss_kib(proc.pid())?;
    let conns = (0..IDLE_CONNECTIONS)
        .map(|_| kind.open(port))
        .collect::<anyhow::Result<Vec<_>>>()
        .with_context(|| format!("opening connections to {proxy}"))?;
    // Timers fire and freed memory settles before the reading.
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(proc.pid())?;
    proc.ensure_alive()?;
    drop(conns);
    Ok((after - before) * 1000.0 / IDLE_CONNECTIONS as f64)
}

fn idle_case(peers: &Peers<'_>) -> anyhow::Result<Vec<IdleRow>> {
    println!();
    println!(
        "Idle connections: {IDLE_CONNECTIONS} connections opened to a fresh proxy, each used once \
         and left idle (or left holding an unfinished head); the growth of its resident memory"
    );
    let mut cases: Vec<(&'static str, Idle)> = Vec::new();
    for proxy in ["harbor", "haproxy"] {
        if proxy == "haproxy" && !peers.haproxy {
            continue;
        }
        if peers.http {
            cases.push((proxy, Idle::Http));
        }
        cases.push((proxy, Idle::Tcp));
    }
    if peers.http {
        cases.push(("harbor", Idle::Head));
    }
    let mut measured: Vec<Vec<f64>> = cases.iter().map(|_| Vec::new()).collect();
    for run in 1..=IDLE_RUNS {
        for (i, &(proxy, kind)) in cases.iter().enumerate() {
            let kib = idle_once(peers, proxy, kind)?;
            println!(
                "  run {run}/{IDLE_RUNS} {:<26} {kib:>8.0} KiB per 1,000 ({:.1} KiB each)",
                format!("{proxy} ({})", kind.name()),
                kib / 1000.0
            );
            measured[i].push(kib);
        }
    }
    Ok(cases
        .iter()
        .zip(measured)
        .map(|(&(name, kind), runs)| IdleRow {
            name,
            kind: kind.name(),
            kib_per_thousand: median(runs),
        })
        .collect())
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "NOT MET" }
}
