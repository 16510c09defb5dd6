//! `agentmesh`: the node and its CLI, one symmetric binary.
//!
//! ```text
//!   main ─ clap ─┬─ node start ─> config::validate ─> start::run ─┬─ mesh_net::Network (libp2p + membership)
//!                │                                                 └─ api::router (axum, HTTP)
//!                └─ members ────> client::ApiClient ── HTTP ──> a node's API
//! ```
//! `node/` is glue: decisions live in the library crates.

mod agent_cli;
mod agents_api;
mod api;
mod checkpoints;
mod client;
mod config;
mod data_cli;
mod data_dir;
mod datasets;
mod forward;
mod members;
mod model_cli;
mod models;
mod rate;
mod region;
mod region_cli;
mod regions_api;
mod sim_cli;
mod start;
mod streams;
mod streams_api;
mod task_cli;
mod tasks;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, NodeConfig, Overrides, DEFAULT_API};

/// Run AI agents at the edge: a peer-to-peer mesh of symmetric nodes.
#[derive(Debug, Parser)]
#[command(name = "agentmesh", version, about)]
struct Cli {
    /// Log format on stderr (logs are filtered by RUST_LOG).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run and manage this machine's node.
    #[command(subcommand)]
    Node(NodeCommand),
    /// Bootstrap a region's Raft group and see its status.
    #[command(subcommand)]
    Region(RegionCommand),
    /// Set and read a region's policy.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// See and try the models the node runs.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Deploy, list, inspect and remove agents.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Submit tasks to any node and read their results.
    #[command(subcommand)]
    Task(TaskCommand),
    /// Put documents on a node, and list a region's datasets.
    #[command(subcommand)]
    Data(DataCommand),
    /// This node's tamper-evident record of the tasks it ran.
    Audit(AuditArgs),
    /// Chaos-test a mesh in the deterministic simulator.
    Sim(sim_cli::SimArgs),
    /// Show the mesh as one node sees it.
    Members {
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RegionCommand {
    /// Start the region's Raft group on its live nodes (any node accepts this).
    Bootstrap {
        /// The region.
        #[arg(long)]
        region: String,
        /// How many voters to pick among the region's live nodes (the ones with the smallest peer ids).
        #[arg(long, default_value_t = 3)]
        voters: usize,
        /// Start with fewer voters when fewer nodes are alive.
        #[arg(long)]
        allow_fewer: bool,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Remove a member (a learner, or a voter) from the region's group at
    /// once, like Consul's force-leave or etcd's member remove: for a node
    /// gone for good. Learners gone past `raft.remove_gone_learner_after_ms`
    /// are removed on their own; a removed node that comes back joins again
    /// as a learner.
    RemoveNode {
        /// The region.
        #[arg(long)]
        region: String,
        /// The peer id of the member to remove.
        peer: String,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
    },
    /// Leader, term, voters, learners, how far each member lags, and whether it is alive.
    Status {
        /// The region.
        #[arg(long)]
        region: String,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// Validate a policy file and make it the region's policy.
    Apply {
        /// The policy file (TOML; see examples/policy.toml).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// The region.
        #[arg(long)]
        region: String,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
    },
    /// Show the region's policy and its version.
    Get {
        /// The region.
        #[arg(long)]
        region: String,
        /// Read through the leader (linearizable) instead of the local replica.
        #[arg(long)]
        consistent: bool,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum TaskCommand {
    /// Submit a task; any node routes it to where the agent runs.
    Submit {
        /// The agent.
        #[arg(long)]
        agent: String,
        /// The input text.
        #[arg(long)]
        input: String,
        /// A data tag of the input (residency rules apply); repeat for several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// A conversation id, for agents that remember one.
        #[arg(long)]
        session: Option<String>,
        /// The idempotency key: a task id submitted again returns its stored result.
        #[arg(long)]
        task_id: Option<String>,
        /// Print generated text as it comes (server-sent events on the API),
        /// then the answer's provenance.
        #[arg(long)]
        stream: bool,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON (with --stream: one JSON object a line, per event).
        #[arg(long)]
        json: bool,
    },
    /// A task's result, from the node it was submitted to (or its host).
    Get {
        /// The task id.
        id: String,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DataCommand {
    /// Store a JSON-lines file of documents on the node (embedded there; they never leave it) and register the dataset.
    Put {
        /// The dataset's name.
        #[arg(long)]
        dataset: String,
        /// One JSON object a line: {"id", "text", "metadata"}.
        #[arg(long, value_name = "FILE")]
        file: PathBuf,
        /// A data tag of the dataset (residency rules apply); repeat for several.
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The node's HTTP API: the node that keeps the documents.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The datasets of a region: node, documents, tags.
    List {
        /// The region [default: the node's].
        #[arg(long)]
        region: Option<String>,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
struct AuditArgs {
    #[command(subcommand)]
    verify: Option<AuditCommand>,
    /// Only this agent's records.
    #[arg(long)]
    agent: Option<String>,
    /// Only records of tasks started at or after this time (Unix milliseconds).
    #[arg(long)]
    since: Option<u64>,
    /// The node's HTTP API.
    #[arg(long, default_value = DEFAULT_API)]
    api: String,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check that the node's audit log is whole: no record changed, removed or reordered.
    Verify {
        /// Every live node's log, and that no task id ran twice across the mesh.
        #[arg(long)]
        all: bool,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// Check an agent manifest and deploy it (to --region, or to every region it lists).
    Deploy {
        /// The manifest (TOML; see examples/agents/).
        #[arg(short = 'f', long = "file", value_name = "FILE")]
        file: PathBuf,
        /// Deploy to this region only.
        #[arg(long)]
        region: Option<String>,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The agents of a region: version, kind, node, epoch, status.
    List {
        /// The region [default: the node's].
        #[arg(long)]
        region: Option<String>,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One agent, with its manifest.
    Get {
        /// The agent's name.
        name: String,
        /// The region [default: the node's].
        #[arg(long)]
        region: Option<String>,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an agent from a region.
    Remove {
        /// The agent's name.
        name: String,
        /// The region [default: the node's].
        #[arg(long)]
        region: Option<String>,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
    },
    /// Move an agent to another live node of its region, with its state;
    /// tasks sent meanwhile wait for it.
    Move {
        /// The agent's name.
        name: String,
        /// The node to move it to: its peer id, or enough of its start to name one node.
        #[arg(long)]
        to: String,
        /// The region [default: the node's].
        #[arg(long)]
        region: Option<String>,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ModelCommand {
    /// The models this node knows: name, kind, sha256, size, loaded or why not.
    List {
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run one model once on the node, as a quick check.
    Run {
        /// The model's name (see `model list`).
        name: String,
        /// The text to embed, or the user's message to answer.
        #[arg(long)]
        input: String,
        /// New tokens at most (generation).
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Continue the input as raw text instead of answering it as a chat turn.
        #[arg(long)]
        raw: bool,
        /// The node's HTTP API.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NodeCommand {
    /// Start a node that joins the mesh; prints `ready peer_id=.. api=.. listen=..` when up.
    Start(StartArgs),
    /// Move every agent off this node, and every copy of agent state it
    /// keeps, to other nodes of its region; then the node may stop.
    Drain {
        /// The HTTP API of the node to drain.
        #[arg(long, default_value = DEFAULT_API)]
        api: String,
        /// Take the draining mark off: the node gets agents again.
        #[arg(long)]
        cancel: bool,
        /// Give up waiting after this many seconds (the mark stays).
        #[arg(long, default_value_t = 120)]
        wait_s: u64,
    },
}

#[derive(Debug, Args)]
struct StartArgs {
    /// Directory for the node's identity and state (created if missing).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Region of this node, for example eu-west.
    #[arg(long)]
    region: Option<String>,
    /// libp2p listen multiaddr; repeat for several [default: /ip4/0.0.0.0/tcp/4001 and /ip4/0.0.0.0/udp/4001/quic-v1].
    #[arg(long = "listen", value_name = "MULTIADDR")]
    listen: Vec<String>,
    /// Multiaddr of a peer to join through; repeat for several.
    #[arg(long = "bootstrap", value_name = "MULTIADDR")]
    bootstrap: Vec<String>,
    /// HTTP API address [default: 127.0.0.1:7070].
    #[arg(long, value_name = "HOST:PORT")]
    api: Option<String>,
    /// The API address to show other people in `members` (never used by nodes, which talk over libp2p).
    #[arg(long, value_name = "HOST:PORT")]
    advertise_api: Option<String>,
    /// TOML config file; flags win over it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Discover peers on the local network with mDNS.
    #[arg(long)]
    mdns: bool,
    /// Directory of the model weights (from scripts/models.sh); without it the node runs no models.
    #[arg(long, value_name = "DIR")]
    models_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        // `agentmesh ... | head` closing the pipe early is not an error.
        Err(e)
            if e.chain().any(|c| {
                c.downcast_ref::<std::io::Error>()
                    .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
            }) =>
        {
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    match cli.command {
        Command::Node(NodeCommand::Start(args)) => {
            let file = match &args.config {
                Some(path) => NodeConfig::load(path).map_err(anyhow::Error::msg)?,
                None => NodeConfig::default(),
            };
            let checked = file
                .validate(Overrides {
                    data_dir: args.data_dir,
                    region: args.region,
                    listen: args.listen,
                    bootstrap: args.bootstrap,
                    api: args.api,
                    advertise_api: args.advertise_api,
                    mdns: args.mdns,
                    log_format: cli.log_format,
                    models_dir: args.models_dir,
                })
                .map_err(|problems| {
                    anyhow::anyhow!(
                        "the node configuration is invalid:\n  - {}",
                        problems.join("\n  - ")
                    )
                })?;
            init_logging(checked.log_format);
            runtime.block_on(start::run(checked))
        }
        Command::Region(RegionCommand::Bootstrap {
            region,
            voters,
            allow_fewer,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(region_cli::bootstrap(
                &api,
                &region,
                voters,
                allow_fewer,
                json,
            ))
        }
        Command::Region(RegionCommand::RemoveNode { region, peer, api }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(region_cli::remove_node(&api, &region, &peer))
        }
        Command::Region(RegionCommand::Status { region, api, json }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(region_cli::status(&api, &region, json))
        }
        Command::Policy(PolicyCommand::Apply { file, region, api }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(region_cli::apply_policy(&api, &region, &file))
        }
        Command::Policy(PolicyCommand::Get {
            region,
            consistent,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(region_cli::get_policy(&api, &region, consistent, json))
        }
        Command::Sim(args) => {
            // Injected faults make the real code log errors by design: the
            // simulator logs only when RUST_LOG asks (to debug a seed).
            if std::env::var_os("RUST_LOG").is_some() {
                init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            }
            sim_cli::run(args)
        }
        Command::Agent(AgentCommand::Deploy {
            file,
            region,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(agent_cli::deploy(&api, &file, region, json))
        }
        Command::Agent(AgentCommand::List { region, api, json }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(agent_cli::list(&api, region, json))
        }
        Command::Agent(AgentCommand::Get {
            name,
            region,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(agent_cli::get(&api, &name, region, json))
        }
        Command::Agent(AgentCommand::Remove { name, region, api }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(agent_cli::remove(&api, &name, region))
        }
        Command::Agent(AgentCommand::Move {
            name,
            to,
            region,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(agent_cli::move_agent(&api, &name, &to, region, json))
        }
        Command::Node(NodeCommand::Drain {
            api,
            cancel,
            wait_s,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(agent_cli::drain(
                &api,
                cancel,
                std::time::Duration::from_secs(wait_s),
            ))
        }
        Command::Task(TaskCommand::Submit {
            agent,
            input,
            tags,
            session,
            task_id,
            stream,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            let request = tasks::TaskRequest {
                agent,
                input,
                tags,
                session,
                task_id,
                stream,
            };
            runtime.block_on(task_cli::submit(&api, request, json))
        }
        Command::Data(DataCommand::Put {
            dataset,
            file,
            tags,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(data_cli::put(&api, &dataset, &file, tags, json))
        }
        Command::Data(DataCommand::List { region, api, json }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(data_cli::list(&api, region, json))
        }
        Command::Task(TaskCommand::Get { id, api, json }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(task_cli::get(&api, &id, json))
        }
        Command::Audit(args) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            match args.verify {
                Some(AuditCommand::Verify {
                    all: true,
                    api,
                    json,
                }) => runtime.block_on(task_cli::verify_all(&api, json)),
                Some(AuditCommand::Verify {
                    all: false,
                    api,
                    json,
                }) => runtime.block_on(task_cli::verify(&api, json)),
                None => runtime.block_on(task_cli::audit(
                    &args.api, args.agent, args.since, args.json,
                )),
            }
        }
        Command::Model(ModelCommand::List { api, json }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(model_cli::list(&api, json))
        }
        Command::Model(ModelCommand::Run {
            name,
            input,
            max_tokens,
            raw,
            api,
            json,
        }) => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(model_cli::run(&api, &name, &input, max_tokens, raw, json))
        }
        Command::Members { api, json } => {
            init_logging(cli.log_format.unwrap_or(LogFormat::Text));
            runtime.block_on(members::run(&api, json))
        }
    }
}

/// Logs go to stderr; stdout is for results (and the ready line).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        // openraft logs every failed replication attempt (many a second to
        // a gone member); the node logs each peer's link once per change of
        // state instead (region::MeshTransport). RUST_LOG shows them all.
        EnvFilter::new(
            "warn,agentmesh=info,mesh_net=info,mesh_membership=info,openraft::replication=off,openraft::network=off,openraft::engine::handler::replication_handler=off",
        )
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
