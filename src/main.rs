//! The `switchyard` command line (CONFIG.md): serve, demo, simulate, check.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use switchyard::{
    config::Config,
    demo, serve, serve_reloading, shutdown_signal, simulator,
    telemetry::{init_logs, LogFormat},
};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "An LLM gateway: one endpoint in front of many providers.")]
struct Cli {
    /// Config file [default: switchyard.toml].
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG")]
    config: Option<PathBuf>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the gateway.
    Serve,
    /// Start the gateway with simulated providers and a demo key.
    Demo {
        /// Where the demo gateway listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Run the provider simulator alone.
    Simulate {
        #[arg(long, default_value_t = 9090)]
        port: u16,
        /// Address to bind.
        #[arg(long, default_value = "127.0.0.1")]
        host: std::net::IpAddr,
        /// Fault profile for every request: default, fast, realistic, slow, flaky.
        #[arg(long, default_value = "default")]
        profile: String,
        /// Seed for answers and random failures.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Validate a config file; every problem is listed.
    Check,
    /// Per-key, per-model summary from the accounting store.
    Usage {
        /// Only this key (by name).
        #[arg(long)]
        key: Option<String>,
        /// Only the last DURATION (e.g. 24h, 30m); default: everything.
        #[arg(long)]
        since: Option<String>,
        #[arg(long, value_enum, default_value_t = UsageFormat::Table)]
        format: UsageFormat,
    },
    /// Mint, list and revoke stored gateway keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum UsageFormat {
    Table,
    Json,
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Mint a key; it is printed once, alone on stdout, and stored hashed.
    Create {
        #[arg(long)]
        name: String,
        /// Globs of public model ids the key may use.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        models: Vec<String>,
        /// Requests per minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens per minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// Spending limit in USD.
        #[arg(long = "budget-usd")]
        budget_usd: Option<f64>,
    },
    /// List stored keys (never the secret).
    List,
    /// Revoke a key by name; every replica refuses it within seconds.
    Revoke { name: String },
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

/// mimalloc rather than glibc's allocator: the request path makes many
/// small, short-lived allocations on several threads.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _logs = match init_logs(cli.log_format) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("error: starting the log writer: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    rt.block_on(run(cli))
}

const DEFAULT_CONFIG: &str = "switchyard.toml";

/// Re-reads and validates the config file on every SIGHUP; a file that
/// does not validate is refused, with each problem logged, and the running
/// config stays.
async fn reload_on_sighup(path: PathBuf, reloads: tokio::sync::mpsc::Sender<Config>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("cannot listen for SIGHUP ({e}); config reload is off");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!(path = %path.display(), "SIGHUP: re-reading the config");
            match Config::load(&path) {
                Ok(config) => {
                    if reloads.send(config).await.is_err() {
                        return;
                    }
                }
                Err(problems) => {
                    for p in &problems {
                        tracing::error!(problem = %p, "config reload refused; the running config stays");
                    }
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, reloads);
    }
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|problems| {
        for p in problems {
            eprintln!("error: {p}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

/// The config for commands that only need the store: the named file, or
/// the embedded defaults when none was named and `switchyard.toml` is absent.
fn load_for_storage(path: Option<&std::path::Path>) -> Result<Config, ExitCode> {
    match path {
        Some(p) => load(p),
        None if std::path::Path::new(DEFAULT_CONFIG).exists() => load(std::path::Path::new(DEFAULT_CONFIG)),
        None => Ok(Config::default()),
    }
}

fn valid_key_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

async fn keys(config: Config, command: KeysCommand) -> ExitCode {
    let storage = match switchyard::storage::Storage::connect(&config.storage.url).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let code = match command {
        KeysCommand::Create { name, models, rpm, tpm, budget_usd } => {
            if !valid_key_name(&name) {
                eprintln!("error: --name must be 1-64 characters of letters, digits, '-', '_' or '.'");
                return ExitCode::from(EXIT_CONFIG);
            }
            if models.iter().any(|m| m.trim().is_empty()) || budget_usd.is_some_and(|b| b.is_nan() || b < 0.0) || rpm == Some(0) || tpm == Some(0) {
                eprintln!("error: --models globs must be non-empty; --rpm and --tpm positive; --budget-usd not negative");
                return ExitCode::from(EXIT_CONFIG);
            }
            if config.keys.iter().any(|k| k.name == name) {
                eprintln!("error: {name:?} is a static key in the config");
                return ExitCode::from(EXIT_CONFIG);
            }
            let key = switchyard::auth::mint();
            let digest = hex::encode(switchyard::auth::digest(&key));
            let models: Vec<String> = models.into_iter().map(|m| m.trim().to_owned()).collect();
            let new = switchyard::storage::NewKey {
                name: &name,
                digest_hex: &digest,
                models: &models,
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                budget_usd,
            };
            match storage.create_key(&new).await {
                Ok(()) => {
                    println!("{key}");
                    eprintln!("created key {name:?} for models {}; it is shown only this once", models.join(","));
                    ExitCode::SUCCESS
                }
                Err(switchyard::storage::StorageError::Conflict(m)) => {
                    eprintln!("error: {m}");
                    ExitCode::from(EXIT_CONFIG)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_RUNTIME)
                }
            }
        }
        KeysCommand::List => match storage.list_keys().await {
            Ok(keys) => {
                let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
                println!("{:<24} {:<8} {:<24} {:>8} {:>10} {:>10}", "NAME", "STATUS", "MODELS", "RPM", "TPM", "BUDGET_USD");
                for k in keys {
                    println!(
                        "{:<24} {:<8} {:<24} {:>8} {:>10} {:>10}",
                        k.name,
                        if k.revoked_at.is_some() { "revoked" } else { "active" },
                        k.models.join(","),
                        opt(k.requests_per_minute.map(|n| n.to_string())),
                        opt(k.tokens_per_minute.map(|n| n.to_string())),
                        opt(k.budget_usd.map(|b| format!("{b:.2}"))),
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
        KeysCommand::Revoke { name } => match storage.revoke_key(&name).await {
            Ok(true) => {
                eprintln!("revoked {name:?}");
                ExitCode::SUCCESS
            }
            Ok(false) => {
                eprintln!("error: no active stored key named {name:?}");
                ExitCode::from(EXIT_CONFIG)
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(EXIT_RUNTIME)
            }
        },
    };
    storage.close().await;
    code
}

async fn usage(config: Config, key: Option<String>, since: Option<String>, format: UsageFormat) -> ExitCode {
    let since = match since.as_deref().map(switchyard::config::parse_duration) {
        None => 0,
        Some(Ok(d)) => switchyard::storage::unix_now() - d.as_secs() as i64,
        Some(Err(e)) => {
            eprintln!("error: --since: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let storage = match switchyard::storage::Storage::connect(&config.storage.url).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    let lines = storage.usage(since, key.as_deref()).await;
    storage.close().await;
    match lines {
        Ok(lines) => {
            match format {
                UsageFormat::Json => println!("{}", serde_json::to_string(&lines).unwrap_or_else(|_| "[]".into())),
                UsageFormat::Table => {
                    println!("{:<24} {:<24} {:>10} {:>14} {:>14} {:>12}", "KEY", "MODEL", "REQUESTS", "INPUT_TOKENS", "OUTPUT_TOKENS", "COST_USD");
                    for l in lines {
                        println!(
                            "{:<24} {:<24} {:>10} {:>14} {:>14} {:>12.6}",
                            l.key, l.model, l.requests, l.input_tokens, l.output_tokens, l.cost_usd
                        );
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn run(cli: Cli) -> ExitCode {
    let config_path = cli.config.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG));
    match cli.command {
        Command::Usage { key, since, format } => match load_for_storage(cli.config.as_deref()) {
            Ok(config) => usage(config, key, since, format).await,
            Err(code) => code,
        },
        Command::Keys { command } => match load_for_storage(cli.config.as_deref()) {
            Ok(config) => keys(config, command).await,
            Err(code) => code,
        },
        Command::Check => match load(&config_path) {
            Ok(c) => {
                println!(
                    "{}: ok ({} providers, {} models, {} keys)",
                    config_path.display(),
                    c.providers.len(),
                    c.models.len(),
                    c.keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve => {
            let config = match load(&config_path) {
                Ok(c) => c,
                Err(code) => return code,
            };
            let listener = match TcpListener::bind(config.server.listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: binding {}: {e}", config.server.listen);
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
            tracing::info!(addr = %addr, "switchyard listening");
            let (reload_tx, reloads) = tokio::sync::mpsc::channel(1);
            tokio::spawn(reload_on_sighup(config_path.clone(), reload_tx));
            finish(serve_reloading(listener, config, shutdown_signal(), reloads).await)
        }
        Command::Demo { listen } => {
            let sim = match TcpListener::bind("127.0.0.1:0").await.and_then(|l| {
                let faults = simulator::Faults::profile("realistic").unwrap_or_default();
                simulator::spawn(l, Arc::new(simulator::SimState::new(1, faults)))
            }) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("error: starting the simulator: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let config = match demo::config(&sim.url(), listen) {
                Ok(c) => c,
                Err(problems) => {
                    for p in problems {
                        eprintln!("error: {p}");
                    }
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let listener = match TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: binding {listen}: {e} (choose another with --listen 127.0.0.1:PORT)");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            let addr = listener.local_addr().unwrap_or(listen);
            println!("{}", demo::banner(addr));
            finish(serve(listener, config, shutdown_signal()).await)
        }
        Command::Simulate { port, host, profile, seed } => {
            let Some(faults) = simulator::Faults::profile(&profile) else {
                eprintln!("error: unknown profile {profile:?}: expected default, fast, realistic, slow or flaky");
                return ExitCode::from(EXIT_CONFIG);
            };
            let listener = match TcpListener::bind((host, port)).await {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("error: binding {host}:{port}: {e}");
                    return ExitCode::from(EXIT_RUNTIME);
                }
            };
            println!("switchyard simulator on http://{}", listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
            let state = Arc::new(simulator::SimState::new(seed, faults));
            tokio::select! {
                _ = simulator::run(listener, state) => {},
                _ = shutdown_signal() => {},
            }
            ExitCode::SUCCESS
        }
    }
}

fn finish(r: Result<(), switchyard::ServeError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}
