//! Region policy: where data may be processed, which models may run, how
//! fast tasks may arrive. Applied through the region's Raft group; its
//! version is the Raft log index at which it was applied.

use serde::{Deserialize, Serialize};

use crate::Region;

/// The policy of one region, as written in `policy.toml`. Callers parse the
/// file (`toml::from_str`), then MUST call [`Policy::validate`] before
/// proposing it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// Data residency: data carrying `tag` may only be processed in
    /// `regions`, and a result derived from it returned to `results`.
    #[serde(default)]
    pub residency: Vec<ResidencyRule>,
    /// Models agents may run, by content hash.
    #[serde(default)]
    pub models: Vec<AllowedModel>,
    /// Task admission limits.
    #[serde(default)]
    pub rate_limits: RateLimits,
}

/// One residency rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResidencyRule {
    /// A data tag, for example `pii-eu`.
    pub tag: String,
    /// Regions where such data may be processed; never empty.
    pub regions: Vec<Region>,
    /// Regions a result derived from such data may be returned to (the
    /// region a task entered in); empty: the same as `regions`.
    #[serde(default)]
    pub results: Vec<Region>,
}

impl ResidencyRule {
    /// Where a result derived from this data may go.
    pub fn result_regions(&self) -> &[Region] {
        if self.results.is_empty() {
            &self.regions
        } else {
            &self.results
        }
    }
}

/// A model that may run, by name and sha256 of its weights.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowedModel {
    /// Registry name, for example `all-minilm-l6-v2`.
    pub name: String,
    /// Lowercase hex sha256, 64 characters.
    pub sha256: String,
}

/// Token-bucket limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimits {
    /// Per agent.
    pub per_agent: Rate,
    /// Per API client.
    pub per_client: Rate,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            per_agent: Rate {
                per_second: 100,
                burst: 200,
            },
            per_client: Rate {
                per_second: 20,
                burst: 40,
            },
        }
    }
}

/// A token bucket: `per_second` sustained, `burst` at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    /// Sustained tasks per second; at least 1.
    pub per_second: u32,
    /// Bucket size; at least 1.
    pub burst: u32,
}

impl Policy {
    /// Every problem with the policy, so a user can fix them all at once.
    pub fn validate(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        let mut tags = std::collections::BTreeSet::new();
        for (i, rule) in self.residency.iter().enumerate() {
            if rule.tag.trim().is_empty() {
                problems.push(format!("residency[{i}]: the tag is empty"));
            }
            if !tags.insert(rule.tag.as_str()) {
                problems.push(format!(
                    "residency[{i}]: tag {:?} has more than one rule",
                    rule.tag
                ));
            }
            if rule.regions.is_empty() {
                problems.push(format!(
                    "residency[{i}] (tag {:?}): the region list is empty; list at least one region",
                    rule.tag
                ));
            }
        }
        for (i, model) in self.models.iter().enumerate() {
            if model.name.trim().is_empty() {
                problems.push(format!("models[{i}]: the name is empty"));
            }
            let hex = model.sha256.len() == 64
                && model
                    .sha256
                    .chars()
                    .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c));
            if !hex {
                problems.push(format!(
                    "models[{i}] ({}): sha256 {:?} is malformed; expected 64 lowercase hex characters",
                    model.name, model.sha256
                ));
            }
        }
        for (name, rate) in [
            ("per_agent", &self.rate_limits.per_agent),
            ("per_client", &self.rate_limits.per_client),
        ] {
            if rate.per_second == 0 {
                problems.push(format!(
                    "rate_limits.{name}.per_second is 0: no task could ever run; use at least 1"
                ));
            }
            if rate.burst == 0 {
                problems.push(format!(
                    "rate_limits.{name}.burst is 0: no task could ever run; use at least 1"
                ));
            }
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
    use super::*;

    fn valid() -> Policy {
        Policy {
            residency: vec![ResidencyRule {
                tag: "pii-eu".into(),
                regions: vec![Region::parse("eu-west").expect("valid")],
                results: vec![],
            }],
            models: vec![AllowedModel {
                name: "all-minilm-l6-v2".into(),
                sha256: "a".repeat(64),
            }],
            rate_limits: RateLimits::default(),
        }
    }

    #[test]
    fn results_go_where_the_rule_says_or_where_the_data_is_processed() {
        let toml = r#"
            [[residency]]
            tag = "pii-eu"
            regions = ["eu-west"]
            results = ["eu-west", "us-east"]

            [[residency]]
            tag = "internal"
            regions = ["us-east"]
        "#;
        let p: Policy = toml::from_str(toml).expect("parses");
        assert_eq!(p.validate(), Ok(()));
        let names = |rs: &[Region]| rs.iter().map(|r| r.to_string()).collect::<Vec<_>>();
        assert_eq!(
            names(p.residency[0].result_regions()),
            ["eu-west", "us-east"]
        );
        assert_eq!(names(p.residency[1].result_regions()), ["us-east"]);
    }

    #[test]
    fn a_valid_policy_passes() {
        assert_eq!(valid().validate(), Ok(()));
    }

    #[test]
    fn every_problem_is_listed() {
        let mut p = valid();
        p.residency.push(ResidencyRule {
            tag: "pii-eu".into(),
            regions: vec![],
            results: vec![],
        });
        p.models[0].sha256 = "XYZ".into();
        p.rate_limits.per_client.per_second = 0;
        let problems = p.validate().expect_err("invalid");
        let all = problems.join("\n");
        assert_eq!(problems.len(), 4, "{all}");
        for needle in [
            "more than one rule",
            "region list is empty",
            "sha256",
            "per_second is 0",
        ] {
            assert!(all.contains(needle), "{needle} missing in {all}");
        }
    }
}
