//! The `switchyard` command line (CONFIG.md): serve, demo, simulate, check.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, sync::Arc};

use clap::{Parser, Subcommand};
use switchyard::{
    config::Config,
    demo, serve, shutdown_signal, simulator,
    telemetry::{init_logs, LogFormat},
};
use tokio::net::TcpListener;

#[derive(Parser)]
#[command(name = "switchyard", version, about = "An LLM gateway: one endpoint in front of many providers.")]
struct Cli {
    /// Config file.
    #[arg(long, global = true, env = "SWITCHYARD_CONFIG", default_value = "switchyard.toml")]
    config: PathBuf,
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
}

const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(EXIT_RUNTIME);
        }
    };
    rt.block_on(run(cli))
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|problems| {
        for p in problems {
            eprintln!("error: {p}");
        }
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Check => match load(&cli.config) {
            Ok(c) => {
                println!(
                    "{}: ok ({} providers, {} models, {} keys)",
                    cli.config.display(),
                    c.providers.len(),
                    c.models.len(),
                    c.keys.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Serve => {
            let config = match load(&cli.config) {
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
            tracing::info!(addr = %config.server.listen, "switchyard listening");
            finish(serve(listener, config, shutdown_signal()).await)
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
