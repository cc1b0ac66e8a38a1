//! The `harbor` binary: parse flags, set up logging, run the daemon until a signal stops it.

use std::process::ExitCode;

use harbor::config::{Cli, Command, Config, LogFormat, PluginCommand};
use tokio::signal::unix::{SignalKind, signal};
use tracing_subscriber::EnvFilter;

/// Each connection allocates and frees a few small objects (its tasks, its I/O registrations)
/// on whichever lane serves it, which mimalloc's per-thread pages do more cheaply than glibc's
/// arenas (see host/benches/README.md, Proxy throughput).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colour only for a person at a terminal, never into journald or a file.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse_with_defaults();
    match &cli.command {
        Some(Command::Plugin(PluginCommand::Check { file })) => return check_plugin(file),
        Some(Command::Echo { listen }) => return echo(listen).await,
        Some(Command::Run) | None => {}
    }
    let config = match Config::from_args(cli.run) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("harbor: {e:#}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_format);
    let result = run(config).await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `harbor echo --listen ADDR,...`: demo backends until a signal stops them.
async fn echo(addrs: &[std::net::SocketAddr]) -> ExitCode {
    init_logging(LogFormat::Text);
    let listeners = match harbor::echo::bind(addrs).await {
        Ok(listeners) => listeners,
        Err(e) => {
            eprintln!("harbor: {e:#}");
            return ExitCode::from(2);
        }
    };
    let stop = tokio_util::sync::CancellationToken::new();
    for listener in listeners {
        tokio::spawn(harbor::echo::serve(listener, stop.clone()));
    }
    let signals = async {
        let mut terminate = signal(SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => {}
            r = tokio::signal::ctrl_c() => r?,
        }
        std::io::Result::Ok(())
    };
    if let Err(e) = signals.await {
        eprintln!("harbor: cannot wait for signals: {e}");
        return ExitCode::FAILURE;
    }
    stop.cancel();
    ExitCode::SUCCESS
}

/// `harbor plugin check FILE`: prints what the component is, or why it may not serve.
fn check_plugin(file: &std::path::Path) -> ExitCode {
    let bytes = match std::fs::read(file) {
        Ok(bytes) => bytes,
        Err(e) => {
            eprintln!("harbor: cannot read {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    // The limits and settings it would have in the plugin directory: its sidecar's, if any.
    let setup = match harbor::plugins::read_sidecar(file) {
        Ok(setup) => setup,
        Err(e) => {
            eprintln!("refused: {e}");
            return ExitCode::FAILURE;
        }
    };
    let source = harbor::plugins::Source::File(file.display().to_string());
    match harbor::plugins::check(&bytes, source, setup) {
        Ok(Ok(info)) => {
            println!(
                "ok: strategy {} {} ({} bytes, sha256 {})",
                info.name.unwrap_or_default(),
                info.version.unwrap_or_default(),
                bytes.len(),
                info.hash.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(Err(rejected)) => {
            eprintln!("refused: {}", rejected.0);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("harbor: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let harbor = harbor::start(config).await?;
    loop {
        tokio::select! {
            _ = hangup.recv() => harbor.rescan(),
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    tracing::info!("shutting down");
    harbor.shutdown().await;
    Ok(())
}
