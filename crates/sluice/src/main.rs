//! `sluice`: the gateway (`sluice serve`) and a CLI for a running server.

mod cli;

/// mimalloc: the gateway allocates small, short-lived buffers per request.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use sluice_core::SystemClock;
use sluice_gateway::{AdminKeySource, Config, ConfigError, FileConfig, Gateway, Overrides};

/// Hard limits on requests, tokens and dollars for AI agents.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
struct Args {
    #[command(subcommand)]
    command: Command,
}

/// Options shared by the commands that talk to a server.
#[derive(Debug, clap::Args, Clone)]
pub struct ClientOpts {
    /// Server URL [default: from the config file, else http://127.0.0.1:8787].
    #[arg(long, env = "SLUICE_SERVER", global = true)]
    pub server: Option<String>,
    /// Config file to read `server`/`listen`/`data_dir` from.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    /// Data directory holding `admin.key` [default: ./sluice-data].
    #[arg(long, env = "SLUICE_DATA_DIR", global = true)]
    pub data_dir: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway.
    Serve {
        /// Address to listen on [env SLUICE_LISTEN; default 127.0.0.1:8787].
        #[arg(long)]
        listen: Option<String>,
        /// Data directory [env SLUICE_DATA_DIR; default ./sluice-data].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TOML config file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Check a config file without starting anything.
    CheckConfig {
        /// The file.
        file: PathBuf,
    },
    /// Manage policies.
    Policy {
        #[command(subcommand)]
        command: cli::PolicyCommand,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Show a subject's usage.
    Usage {
        /// The subject, e.g. agent://acme/prod/bot.
        subject: String,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Manage agent keys.
    Keys {
        #[command(subcommand)]
        command: cli::KeysCommand,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Read the audit trail (policy and key changes, kills, breaches).
    Audit {
        #[command(flatten)]
        args: cli::AuditArgs,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// The kill switch: stop, resume and list agents.
    Agents {
        #[command(subcommand)]
        command: cli::AgentsCommand,
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Human approval: list, approve and deny held requests.
    Approvals {
        #[command(subcommand)]
        command: cli::ApprovalsCommand,
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// `SLUICE_*` settings and the whole environment (for providers' `api_key_env`).
pub fn process_env() -> Overrides {
    Overrides {
        env: std::env::vars().collect(),
        ..Overrides::from_env(|k| std::env::var(k).ok())
    }
}

fn config_error(e: &ConfigError) -> ExitCode {
    eprintln!("sluice: {e}");
    ExitCode::from(2)
}

fn init_logging() {
    let level = std::env::var("SLUICE_LOG")
        .ok()
        .and_then(|l| l.parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down: finishing in-flight requests and flushing the ledger");
}

async fn serve(
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    config: Option<PathBuf>,
) -> ExitCode {
    init_logging();
    let env = process_env();
    let flags = Overrides {
        listen,
        data_dir,
        ..Overrides::default()
    };
    let config = match Config::load(config.as_deref(), env.overlaid_with(flags)) {
        Ok(c) => c,
        Err(e) => return config_error(&e),
    };
    let listen = config.listen;
    tracing::info!("limits {}", config.store.describe());
    tracing::info!("busy polling {}", busy_poll(&config));
    let gateway = match Gateway::start(config, Arc::new(SystemClock)).await {
        Ok(g) => g,
        Err(e) => {
            eprintln!("sluice: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match &gateway.admin_key_source {
        AdminKeySource::Generated(path) => {
            eprintln!(
                "sluice: generated an admin key; it is in {}",
                path.display()
            );
        }
        AdminKeySource::File(path) => {
            tracing::info!("admin key from {}", path.display());
        }
        AdminKeySource::Environment => tracing::info!("admin key from SLUICE_ADMIN_KEY"),
    }
    let r = &gateway.recovery;
    tracing::info!(
        "loaded {} policies; replayed {} ledger rows; {} unsettled reservations settled",
        r.policies,
        r.rows,
        r.unsettled
    );
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sluice: cannot listen on {listen}: {e}");
            gateway.shutdown().await;
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(listen, |a| a);
    eprintln!("sluice: listening on http://{addr}");
    match gateway.serve(listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sluice: server error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `busy_poll_ms` as `check-config` and the start-up log say it.
fn busy_poll(c: &Config) -> String {
    c.busy_poll
        .map_or_else(|| "off".to_owned(), |w| format!("{} ms", w.as_millis()))
}

fn check_config(file: &std::path::Path) -> ExitCode {
    let parsed = FileConfig::load(file).and_then(|f| Config::resolve(f, process_env()));
    match parsed {
        Ok(c) => {
            println!(
                "{}: ok (listen {}, data_dir {}, ledger_sync {:?}, limits {}, busy polling {})",
                file.display(),
                c.listen,
                c.data_dir.display(),
                c.ledger_sync,
                c.store.describe(),
                busy_poll(&c)
            );
            ExitCode::SUCCESS
        }
        Err(e) => config_error(&e),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sluice: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        match args.command {
            Command::Serve {
                listen,
                data_dir,
                config,
            } => serve(listen, data_dir, config).await,
            Command::CheckConfig { file } => check_config(&file),
            Command::Policy { command, opts } => cli::run(&opts, cli::Op::Policy(command)).await,
            Command::Usage { subject, opts } => cli::run(&opts, cli::Op::Usage(subject)).await,
            Command::Keys { command, opts } => cli::run(&opts, cli::Op::Keys(command)).await,
            Command::Agents { command, opts } => cli::run(&opts, cli::Op::Agents(command)).await,
            Command::Approvals { command, opts } => {
                cli::run(&opts, cli::Op::Approvals(command)).await
            }
            Command::Audit { args, opts } => cli::run(&opts, cli::Op::Audit(args)).await,
        }
    })
}
