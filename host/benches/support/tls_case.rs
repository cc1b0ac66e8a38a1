//! The HTTPS case: new TLS connections (a full handshake each, `Connection: close`) and keep-alive
//! requests over TLS, through Harbor, HAProxy (OpenSSL), Caddy and Envoy in one run. Every proxy
//! serves the same certificate for `localhost` (ECDSA P-256, made here with rcgen) in front of
//! the same nginx; wrk (OpenSSL) negotiates TLS 1.3 and never resumes a session, so each new
//! connection is a full handshake.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context;

use super::{
    Proc, RUN_SECS, RUNS, Target, WARMUP_SECS, WRK_CONNECTIONS, WRK_THREADS, local, median,
    parse_wrk, ratio, rounds, rows, run_tool, spawn_harbor, verdict, wait_listening,
};

/// The host every proxy serves: it resolves to 127.0.0.1 without help, as wrk needs for SNI.
const NAME: &str = "localhost";

pub struct TlsRow {
    pub name: &'static str,
    pub keepalive_rps: f64,
    pub keepalive_cpu_us: f64,
    pub handshakes: f64,
    pub handshake_cpu_us: f64,
    pub errors: u64,
}

/// Starts a peer proxy: work directory, certificate, its port, nginx's port, Envoy's admin port.
type Starter = fn(&Path, &Certificate, u16, u16, u16) -> anyhow::Result<Proc>;

/// The certificate all proxies serve, as the files each wants.
struct Certificate {
    cert: PathBuf,
    key: PathBuf,
    /// Certificate and key in one file, as HAProxy reads them.
    combined: PathBuf,
}

fn certificate(dir: &Path) -> anyhow::Result<Certificate> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec![NAME.to_owned()])?;
    let cert = params.self_signed(&key)?;
    let files = Certificate {
        cert: dir.join("tls-cert.pem"),
        key: dir.join("tls-key.pem"),
        combined: dir.join("tls-combined.pem"),
    };
    std::fs::write(&files.cert, cert.pem())?;
    std::fs::write(&files.key, key.serialize_pem())?;
    std::fs::write(&files.combined, cert.pem() + &key.serialize_pem())?;
    Ok(files)
}

fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("cannot find free ports")?;
    Ok(held
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<Result<_, _>>()?)
}

/// Runs the case and prints its table; returns the goal lines for the summary.
pub fn tls_case(dir: &Path, harbor_bin: &Path, nginx_port: u16) -> anyhow::Result<Vec<String>> {
    let cert = certificate(dir)?;
    let ports = free_ports(6)?;
    let (harbor_plain, harbor_tls, haproxy, caddy, envoy, envoy_admin) =
        (ports[0], ports[1], ports[2], ports[3], ports[4], ports[5]);
    let route = format!(
        "host = \"{NAME}\"\nupstreams = [\"{}\"]\nstrategy = \"round-robin\"\nredirect_http = false\n\
         tls = {{ cert = \"{}\", key = \"{}\" }}\n",
        local(nginx_port),
        cert.cert.display(),
        cert.key.display()
    );
    let tls_listen = local(harbor_tls).to_string();
    let harbor = spawn_harbor(
        dir,
        harbor_bin,
        "harbor-tls",
        &[("bench.route", route)],
        harbor_plain,
        &["--tls-listen", &tls_listen],
    )?;
    let mut procs = vec![("harbor", harbor_tls, harbor)];
    let peers: [(&'static str, u16, Starter); 3] = [
        ("haproxy", haproxy, start_haproxy),
        ("caddy", caddy, start_caddy),
        ("envoy", envoy, start_envoy),
    ];
    for (name, port, start) in peers {
        match start(dir, &cert, port, nginx_port, envoy_admin) {
            Ok(proc) => procs.push((name, port, proc)),
            Err(e) => println!("skipped {name} for HTTPS: {e:#}"),
        }
    }
    let mut targets = Vec::new();
    for (name, port, proc) in &procs {
        match wait_listening(proc, *port) {
            Ok(()) => targets.push(Target::new(name, *port, proc)),
            Err(e) if *name == "harbor" => return Err(e),
            Err(e) => println!("skipped {name} for HTTPS: {e:#}"),
        }
    }

    println!();
    println!(
        "HTTPS: wrk -t{WRK_THREADS} -c{WRK_CONNECTIONS} -d{RUN_SECS}s to https://{NAME}:PORT/, \
         ECDSA P-256, TLS 1.3; handshakes: every request on a new connection (Connection: close); \
         CPU is the proxy's"
    );
    let scratch = tempfile::tempdir()?;
    let kept = measure(&targets, false, "req", scratch.path())?;
    let new = measure(&targets, true, "handshake", scratch.path())?;
    let table: Vec<TlsRow> = kept
        .into_iter()
        .zip(new)
        .zip(&targets)
        .map(|(((rps, cpu, e1), (hs, hs_cpu, e2)), target)| TlsRow {
            name: target.name,
            keepalive_rps: rps,
            keepalive_cpu_us: cpu,
            handshakes: hs,
            handshake_cpu_us: hs_cpu,
            errors: e1 + e2,
        })
        .collect();
    let haproxy_row = table.iter().find(|r| r.name == "haproxy");
    println!();
    println!(
        "{:<10} {:>12} {:>11} {:>10} {:>14} {:>11} {:>13} {:>7}",
        "HTTPS",
        "keep-alive/s",
        "vs haproxy",
        "µs/req",
        "handshakes/s",
        "vs haproxy",
        "µs/handshake",
        "errors"
    );
    for r in &table {
        println!(
            "{:<10} {:>12.0} {:>11} {:>10.1} {:>14.0} {:>11} {:>13.1} {:>7}",
            r.name,
            r.keepalive_rps,
            ratio(r.keepalive_rps, haproxy_row.map(|p| p.keepalive_rps)),
            r.keepalive_cpu_us,
            r.handshakes,
            ratio(r.handshakes, haproxy_row.map(|p| p.handshakes)),
            r.handshake_cpu_us,
            r.errors
        );
    }
    let harbor_row = table.iter().find(|r| r.name == "harbor");
    let mut goals = Vec::new();
    match (harbor_row, haproxy_row) {
        (Some(h), Some(p)) => {
            goals.push(format!(
                "TLS handshakes/s >= HAProxy's: harbor {:.0}, haproxy {:.0} ({})",
                h.handshakes,
                p.handshakes,
                verdict(h.handshakes >= p.handshakes)
            ));
            goals.push(format!(
                "TLS keep-alive req/s >= HAProxy's: harbor {:.0}, haproxy {:.0} ({})",
                h.keepalive_rps,
                p.keepalive_rps,
                verdict(h.keepalive_rps >= p.keepalive_rps)
            ));
        }
        _ => goals.push("TLS: not measured against HAProxy (HAProxy missing)".into()),
    }
    for (_, _, proc) in procs {
        drop(proc);
    }
    Ok(goals)
}

/// Rounds of wrk runs over HTTPS against every target, keep-alive or (`close`) one request per
/// connection: per target, the median rate and CPU per `unit`, and the errors of every run.
fn measure(
    targets: &[Target<'_>],
    close: bool,
    unit: &str,
    scratch: &Path,
) -> anyhow::Result<Vec<(f64, f64, u64)>> {
    let runs = rounds(
        targets,
        RUNS,
        |t| wrk_tls(t, WARMUP_SECS, close, scratch).map(drop),
        |t| wrk_tls(t, RUN_SECS, close, scratch),
        |r| {
            format!(
                "{:>9.0} {unit}s/s  {:>6.1} µs CPU/{unit}  errors {}",
                r.0, r.1, r.2
            )
        },
    )?;
    Ok(rows(targets, &runs, |_, runs| {
        (
            median(runs.iter().map(|r| r.0)),
            median(runs.iter().map(|r| r.1)),
            runs.iter().map(|r| r.2).sum::<u64>(),
        )
    }))
}

/// One wrk run over HTTPS: requests (or handshakes) per second, the proxy's CPU µs for each,
/// and wrk's errors.
fn wrk_tls(
    target: &Target<'_>,
    secs: u64,
    close: bool,
    scratch: &Path,
) -> anyhow::Result<(f64, f64, u64)> {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{WRK_THREADS}"))
        .arg(format!("-c{WRK_CONNECTIONS}"))
        .arg(format!("-d{secs}s"))
        .args(["--latency", "--timeout", "2s"]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("https://{NAME}:{}/", target.port));
    let before = target.proc.cpu();
    let out = run_tool(cmd, Duration::from_secs(secs) + super::TOOL_SLACK, scratch)?;
    let cpu = target.proc.cpu().saturating_sub(before);
    let run = parse_wrk(&out).with_context(|| format!("cannot read wrk's output:\n{out}"))?;
    let per = cpu.as_secs_f64() * 1e6 / run.requests.max(1) as f64;
    Ok((run.rps, per, run.errors))
}

fn start_haproxy(
    dir: &Path,
    cert: &Certificate,
    port: u16,
    nginx: u16,
    _: u16,
) -> anyhow::Result<Proc> {
    let mut conf = String::from(
        "global\n  nbthread 2\n  maxconn 8000\n  ssl-default-bind-options ssl-min-ver TLSv1.2\n\
         defaults\n  timeout connect 3s\n  timeout client 60s\n  timeout server 60s\n",
    );
    write!(
        conf,
        "frontend https_in\n  mode http\n  bind {} ssl crt {} alpn http/1.1\n  default_backend https\n\
         backend https\n  mode http\n  server s1 {}\n{}",
        local(port),
        cert.combined.display(),
        local(nginx),
        super::HAPROXY_HEADERS.replace("X-Forwarded-Proto http", "X-Forwarded-Proto https")
    )?;
    let file = dir.join("haproxy-tls.cfg");
    std::fs::write(&file, conf)?;
    let mut cmd = Command::new("haproxy");
    cmd.arg("-db").arg("-f").arg(&file);
    Proc::spawn("haproxy-tls", cmd, dir)
}

fn start_caddy(
    dir: &Path,
    cert: &Certificate,
    port: u16,
    nginx: u16,
    _: u16,
) -> anyhow::Result<Proc> {
    let config = serde_json::json!({
        "admin": { "disabled": true },
        "logging": { "logs": { "default": { "level": "ERROR" } } },
        "apps": {
            "tls": { "certificates": { "load_files": [
                { "certificate": cert.cert, "key": cert.key }
            ] } },
            "http": { "servers": { "bench": {
                "listen": [local(port).to_string()],
                "automatic_https": { "disable": true },
                "tls_connection_policies": [ {} ],
                "routes": [ { "handle": [ {
                    "handler": "reverse_proxy",
                    "upstreams": [ { "dial": local(nginx).to_string() } ]
                } ] } ]
            } } }
        }
    });
    super::spawn_caddy(dir, "caddy-tls", &config)
}

fn start_envoy(
    dir: &Path,
    cert: &Certificate,
    port: u16,
    nginx: u16,
    admin: u16,
) -> anyhow::Result<Proc> {
    let yaml = format!(
        "admin:\n  address:\n    socket_address: {{ address: 127.0.0.1, port_value: {admin} }}\n\
         static_resources:\n  listeners:\n\
         \x20 - name: https\n    address:\n      socket_address: {{ address: 127.0.0.1, port_value: {port} }}\n\
         \x20   filter_chains:\n    - transport_socket:\n        name: envoy.transport_sockets.tls\n\
         \x20       typed_config:\n\
         \x20         \"@type\": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext\n\
         \x20         common_tls_context:\n            alpn_protocols: [\"http/1.1\"]\n\
         \x20           tls_certificates:\n            - certificate_chain: {{ filename: \"{cert}\" }}\n\
         \x20             private_key: {{ filename: \"{key}\" }}\n\
         \x20     filters:\n{hcm}\
         \x20 clusters:\n  - name: nginx\n    type: STATIC\n    connect_timeout: 3s\n    load_assignment:\n\
         \x20     cluster_name: nginx\n      endpoints:\n      - lb_endpoints:\n\
         \x20       - endpoint:\n            address:\n              socket_address: \
         {{ address: 127.0.0.1, port_value: {nginx} }}\n",
        cert = cert.cert.display(),
        key = cert.key.display(),
        hcm = super::envoy_to_nginx("https"),
    );
    let file = dir.join("envoy-tls.yaml");
    std::fs::write(&file, yaml)?;
    let mut cmd = Command::new("envoy");
    cmd.arg("-c")
        .arg(&file)
        .args(["--concurrency", "2", "--log-level", "warn"])
        .arg("--disable-hot-restart")
        .args(["--base-id", "7"]);
    Proc::spawn("envoy-tls", cmd, dir)
}
