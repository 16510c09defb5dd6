//! Agent manifests (`agent.toml`, examples in `examples/agents/`): what an
//! agent is, which models and dataset it uses, where it may run. Parsed
//! strictly (unknown fields are errors) and checked against the model
//! registry, the region's policy and datasets, listing every problem at once.

use std::collections::BTreeSet;

pub use mesh_types::agent::{AgentKind, Manifest, ModelRef, CONCURRENCY_MAX, NAME_MAX};
use mesh_types::policy::Policy;
use mesh_types::Region;

/// Longest manifest file accepted.
pub const MANIFEST_BYTES_MAX: usize = 16 * 1024;

/// Most models one manifest lists.
pub const MODELS_MAX: usize = 16;
/// Most regions one manifest lists.
pub const REGIONS_MAX: usize = 64;

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

/// Every problem with deploying `manifest` to `region`, given the model
/// registry, the region's policy and the datasets it knows.
pub fn check(
    manifest: &Manifest,
    region: &Region,
    registry: &[ModelInfo],
    policy: Option<&Policy>,
    datasets: &[String],
) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    let name_ok = !manifest.name.is_empty()
        && manifest.name.len() <= NAME_MAX
        && manifest
            .name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !manifest.name.starts_with('-');
    if !name_ok {
        problems.push(format!(
            "name {:?}: use 1 to {NAME_MAX} lowercase letters, digits and '-' (not first)",
            manifest.name
        ));
    }
    if manifest.version.trim().is_empty() || manifest.version.len() > NAME_MAX {
        problems.push(format!(
            "version {:?}: give a version of 1 to {NAME_MAX} characters",
            manifest.version
        ));
    }
    if manifest.models.len() > MODELS_MAX || manifest.regions.len() > REGIONS_MAX {
        problems.push(format!(
            "a manifest lists at most {MODELS_MAX} models and {REGIONS_MAX} regions"
        ));
    }
    if manifest.regions.is_empty() {
        problems.push("regions is empty: list the regions where the agent may run".into());
    } else if !manifest.regions.contains(region) {
        let allowed: Vec<&str> = manifest.regions.iter().map(Region::as_str).collect();
        problems.push(format!(
            "region {region} is not allowed by the manifest (regions: {})",
            allowed.join(", ")
        ));
    }
    if manifest.concurrency == 0 || manifest.concurrency > CONCURRENCY_MAX {
        problems.push(format!(
            "concurrency {}: use 1 to {CONCURRENCY_MAX}",
            manifest.concurrency
        ));
    }
    if manifest.latency_budget_ms == 0 {
        problems.push("latency_budget_ms is 0: give the time a task should take".into());
    }
    let mut seen = BTreeSet::new();
    let (mut embeds, mut generates) = (false, false);
    for model in &manifest.models {
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
    let kind = manifest.kind.as_str();
    if manifest.kind.embeds() && !embeds {
        problems.push(format!("a {kind} agent needs an embedding model in models"));
    }
    if manifest.kind.generates() && !generates {
        problems.push(format!("a {kind} agent needs a generation model in models"));
    }
    match (&manifest.dataset, manifest.kind.needs_dataset()) {
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
        assert_eq!(
            check(&m, &eu(), &registry(), None, &["docs".into()]),
            Ok(())
        );
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
        let problems = check(&m, &us, &registry(), Some(&policy), &[]).expect_err("invalid");
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
        assert_eq!(check(&echo, &eu(), &registry(), None, &[]), Ok(()));
        let search = Manifest {
            kind: AgentKind::Search,
            ..echo.clone()
        };
        let problems = check(&search, &eu(), &registry(), None, &[]).expect_err("needs");
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
            check(&manifest, &region, &registry, None, &datasets)
                .unwrap_or_else(|p| panic!("{}: {p:?}", path.display()));
            checked += 1;
        }
        assert!(checked >= 3, "{checked} examples");
    }
}
