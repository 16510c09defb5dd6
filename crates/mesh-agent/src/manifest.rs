//! Agent manifests (`agent.toml`, examples in `examples/agents/`): what an
//! agent is, which models and dataset it uses, where it may run. Parsed
//! strictly (unknown fields are errors) and checked against the model
//! registry, the region's policy and datasets, listing every problem at once.

use std::collections::BTreeSet;

use mesh_types::policy::Policy;
use mesh_types::Region;
use serde::{Deserialize, Serialize};

/// Longest manifest file accepted.
pub const MANIFEST_BYTES_MAX: usize = 16 * 1024;
/// Longest agent name; names are lowercase letters, digits and '-'.
pub const NAME_MAX: usize = 64;
/// Most tasks one activation runs at once.
pub const CONCURRENCY_MAX: u32 = 256;

/// The built-in kinds. A kind hosted in WebAssembly would be one more
/// variant here; routing and placement do not look at the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    /// Returns its input: measures the mesh itself.
    Echo,
    /// Returns the embedding of its input.
    Embed,
    /// Chat completion, with conversation memory per session.
    Generate,
    /// Semantic search over its dataset: the top-k documents with scores.
    Search,
    /// Search, then generate an answer that cites the documents used.
    Rag,
}

impl AgentKind {
    /// Every kind, for error messages.
    pub const ALL: [AgentKind; 5] = [
        AgentKind::Echo,
        AgentKind::Embed,
        AgentKind::Generate,
        AgentKind::Search,
        AgentKind::Rag,
    ];

    /// Its name in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::Echo => "echo",
            AgentKind::Embed => "embed",
            AgentKind::Generate => "generate",
            AgentKind::Search => "search",
            AgentKind::Rag => "rag",
        }
    }

    /// Needs an embedding model.
    pub fn embeds(self) -> bool {
        matches!(self, AgentKind::Embed | AgentKind::Search | AgentKind::Rag)
    }

    /// Needs a generation model.
    pub fn generates(self) -> bool {
        matches!(self, AgentKind::Generate | AgentKind::Rag)
    }

    /// Works on a dataset.
    pub fn needs_dataset(self) -> bool {
        matches!(self, AgentKind::Search | AgentKind::Rag)
    }
}

/// A model an agent uses, by registry name and the sha256 of its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Registry name, e.g. `all-minilm-l6-v2`.
    pub name: String,
    /// Lowercase hex sha256 of the weights.
    pub sha256: String,
}

/// An agent manifest as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Unique in a region: lowercase letters, digits and '-'.
    pub name: String,
    /// Free text, e.g. `1.0.0`; recorded with every task.
    pub version: String,
    /// What it does.
    pub kind: AgentKind,
    /// The models it runs.
    #[serde(default)]
    pub models: Vec<ModelRef>,
    /// The dataset it works on (`search`, `rag`).
    #[serde(default)]
    pub dataset: Option<String>,
    /// Regions where it may run; never empty.
    pub regions: Vec<Region>,
    /// Tasks one activation runs at once. Default 4.
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
    /// A task should be answered within this; every result says whether it was.
    pub latency_budget_ms: u64,
}

fn default_concurrency() -> u32 {
    4
}

/// What the registry says of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// Registry name.
    pub name: String,
    /// Its sha256.
    pub sha256: String,
    /// True for an embedding model, false for a generation model.
    pub embeds: bool,
}

/// Parses `agent.toml`, refusing a file over [`MANIFEST_BYTES_MAX`].
pub fn parse(text: &str) -> Result<Manifest, String> {
    if text.len() > MANIFEST_BYTES_MAX {
        return Err(format!(
            "the manifest is {} bytes, more than the {MANIFEST_BYTES_MAX} allowed",
            text.len()
        ));
    }
    toml::from_str(text).map_err(|e| {
        let known: Vec<&str> = AgentKind::ALL.iter().map(|k| k.as_str()).collect();
        format!(
            "invalid agent manifest: {e} (kinds: {}; see examples/agents/)",
            known.join(", ")
        )
    })
}

impl Manifest {
    /// Every problem with deploying this manifest to `region`, given the
    /// model registry, the region's policy and the datasets it knows.
    pub fn check(
        &self,
        region: &Region,
        registry: &[ModelInfo],
        policy: Option<&Policy>,
        datasets: &[String],
    ) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let name_ok = !self.name.is_empty()
            && self.name.len() <= NAME_MAX
            && self
                .name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.name.starts_with('-');
        if !name_ok {
            problems.push(format!(
                "name {:?}: use 1 to {NAME_MAX} lowercase letters, digits and '-' (not first)",
                self.name
            ));
        }
        if self.version.trim().is_empty() || self.version.len() > NAME_MAX {
            problems.push(format!(
                "version {:?}: give a version of 1 to {NAME_MAX} characters",
                self.version
            ));
        }
        if self.regions.is_empty() {
            problems.push("regions is empty: list the regions where the agent may run".into());
        } else if !self.regions.contains(region) {
            let allowed: Vec<&str> = self.regions.iter().map(Region::as_str).collect();
            problems.push(format!(
                "region {region} is not allowed by the manifest (regions: {})",
                allowed.join(", ")
            ));
        }
        if self.concurrency == 0 || self.concurrency > CONCURRENCY_MAX {
            problems.push(format!(
                "concurrency {}: use 1 to {CONCURRENCY_MAX}",
                self.concurrency
            ));
        }
        if self.latency_budget_ms == 0 {
            problems.push("latency_budget_ms is 0: give the time a task should take".into());
        }
        let mut seen = BTreeSet::new();
        let (mut embeds, mut generates) = (false, false);
        for model in &self.models {
            if !seen.insert(model.name.as_str()) {
                problems.push(format!("model {} is listed twice", model.name));
                continue;
            }
            match registry.iter().find(|m| m.name == model.name) {
                None => {
                    let known: Vec<&str> = registry.iter().map(|m| m.name.as_str()).collect();
                    problems.push(format!(
                        "unknown model {:?} (known: {})",
                        model.name,
                        known.join(", ")
                    ));
                }
                Some(info) if info.sha256 != model.sha256 => problems.push(format!(
                    "model {}: sha256 {} is not the registry's {}",
                    model.name, model.sha256, info.sha256
                )),
                Some(info) => {
                    embeds |= info.embeds;
                    generates |= !info.embeds;
                }
            }
            if let Some(policy) = policy.filter(|p| !p.models.is_empty()) {
                let allowed = policy
                    .models
                    .iter()
                    .any(|m| m.name == model.name && m.sha256 == model.sha256);
                if !allowed {
                    problems.push(format!(
                        "model {} ({}) is not allowed by region {region}'s policy",
                        model.name, model.sha256
                    ));
                }
            }
        }
        let kind = self.kind.as_str();
        if self.kind.embeds() && !embeds {
            problems.push(format!("a {kind} agent needs an embedding model in models"));
        }
        if self.kind.generates() && !generates {
            problems.push(format!("a {kind} agent needs a generation model in models"));
        }
        match (&self.dataset, self.kind.needs_dataset()) {
            (None, true) => problems.push(format!("a {kind} agent needs a dataset")),
            (Some(d), _) if !datasets.contains(d) => problems.push(format!(
                "unknown dataset {d:?} in region {region} (known: {}); put it first with `agentmesh data put --dataset {d}`",
                if datasets.is_empty() { "none".to_owned() } else { datasets.join(", ") }
            )),
            _ => {}
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

#[cfg(test)]
mod tests {
    use mesh_types::policy::AllowedModel;

    use super::*;

    fn registry() -> Vec<ModelInfo> {
        vec![
            ModelInfo {
                name: "mini".into(),
                sha256: "a".repeat(64),
                embeds: true,
            },
            ModelInfo {
                name: "smol".into(),
                sha256: "b".repeat(64),
                embeds: false,
            },
        ]
    }

    fn eu() -> Region {
        Region::parse("eu-west").expect("region")
    }

    const RAG: &str = r#"
        name = "docs-rag"
        version = "1.0.0"
        kind = "rag"
        dataset = "docs"
        regions = ["eu-west"]
        latency_budget_ms = 5000
        [[models]]
        name = "mini"
        sha256 = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        [[models]]
        name = "smol"
        sha256 = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"
    "#;

    #[test]
    fn a_valid_manifest_passes_with_defaults() {
        let m = parse(RAG).expect("parse");
        assert_eq!(m.concurrency, 4);
        assert_eq!(m.check(&eu(), &registry(), None, &["docs".into()]), Ok(()));
    }

    #[test]
    fn unknown_kinds_and_fields_are_refused_at_parse() {
        let e = parse(&RAG.replace("\"rag\"", "\"python\"")).expect_err("kind");
        assert!(
            e.contains("unknown variant") && e.contains("echo, embed"),
            "{e}"
        );
        let e = parse(&format!("{RAG}\ncolour = 1")).expect_err("field");
        assert!(e.contains("colour") || e.contains("unknown field"), "{e}");
        let e = parse(&"x".repeat(MANIFEST_BYTES_MAX + 1)).expect_err("size");
        assert!(e.contains("bytes"), "{e}");
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let mut m = parse(RAG).expect("parse");
        m.name = "Docs RAG".into();
        m.models[0].sha256 = "c".repeat(64);
        m.models[1].name = "gpt".into();
        m.dataset = Some("nope".into());
        m.concurrency = 0;
        let us = Region::parse("us-east").expect("region");
        let policy = Policy {
            models: vec![AllowedModel {
                name: "smol".into(),
                sha256: "b".repeat(64),
            }],
            ..Policy::default()
        };
        let problems = m
            .check(&us, &registry(), Some(&policy), &[])
            .expect_err("invalid");
        let all = problems.join("\n");
        for needle in [
            "name \"Docs RAG\"",
            "region us-east is not allowed",
            "concurrency 0",
            "not the registry's",
            "unknown model \"gpt\"",
            "not allowed by region us-east's policy",
            "needs an embedding model",
            "needs a generation model",
            "unknown dataset \"nope\"",
        ] {
            assert!(all.contains(needle), "missing {needle:?} in\n{all}");
        }
    }

    #[test]
    fn kinds_state_what_they_need() {
        let echo = Manifest {
            name: "echo".into(),
            version: "1".into(),
            kind: AgentKind::Echo,
            models: vec![],
            dataset: None,
            regions: vec![eu()],
            concurrency: 64,
            latency_budget_ms: 100,
        };
        assert_eq!(echo.check(&eu(), &registry(), None, &[]), Ok(()));
        let search = Manifest {
            kind: AgentKind::Search,
            ..echo.clone()
        };
        let problems = search
            .check(&eu(), &registry(), None, &[])
            .expect_err("needs");
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}

#[cfg(test)]
mod example_tests {
    use super::*;

    /// The manifests shipped in examples/agents/ parse and pass their checks
    /// against the real registry's hashes.
    #[test]
    fn the_shipped_examples_are_valid() {
        let registry = vec![
            ModelInfo {
                name: "all-minilm-l6-v2".into(),
                sha256: "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db".into(),
                embeds: true,
            },
            ModelInfo {
                name: "smollm2-135m-instruct-q4_1".into(),
                sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53".into(),
                embeds: false,
            },
        ];
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/agents");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/agents") {
            let path = entry.expect("entry").path();
            let text = std::fs::read_to_string(&path).expect("read");
            let manifest = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let region = manifest.regions[0].clone();
            let datasets: Vec<String> = manifest.dataset.iter().cloned().collect();
            manifest
                .check(&region, &registry, None, &datasets)
                .unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
            checked += 1;
        }
        assert!(checked >= 3, "{checked} examples");
    }
}
