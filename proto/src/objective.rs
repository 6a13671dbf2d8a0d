//! What an RL step optimises: the policy-gradient algorithm, the off-policy correction, the KL
//! penalty and how per-token terms are averaged, as one validated [`Objective`].
//!
//! It lives in the wire crate because the orchestrator names a stage's objective (per stage,
//! and per environment where a stage's mixture says so) and sends it with every scored group,
//! while the learner evaluates it; neither depends on the other. The arithmetic itself is the
//! learner's (`chorus_learner::objective`), and `chorus loss` evaluates the same code on a batch
//! given as tensors.
//!
//! Every setting has a default that depends on the algorithm ([`Objective::for_algorithm`]);
//! [`Objective::set`] changes one setting by name, with an error that names the setting and
//! what it allows.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The policy-gradient estimator.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// Clipped surrogate, sequence-mean of token-means, eps 0.2/0.2.
    #[default]
    Grpo,
    /// Clipped surrogate with clip-higher, token mean, eps 0.2/0.28.
    Dapo,
    /// Clipped surrogate, summed over tokens and divided by a constant length (no length bias).
    DrGrpo,
    /// Clipped sequence-level ratio (geometric mean of token ratios), eps 3e-4/4e-4.
    Gspo,
    /// Clipped, stop-gradient importance weight times the log-probability (no token is dropped).
    Cispo,
    /// Plain policy gradient `A * log p` (RLOO with `advantage = "leave_one_out"`).
    Reinforce,
}

/// How the sampler's log-probabilities are corrected for (the weight `w` of each token).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Correction {
    /// `w = 1`.
    #[default]
    None,
    /// Truncated importance sampling: `w = min(rho, tis_cap)`.
    Tis,
    /// `w = rho` inside `[icepop_low, icepop_high]`, else 0.
    Icepop,
    /// A sequence whose geometric-mean `rho` leaves `[icepop_low, icepop_high]` is masked out;
    /// the others get `min(rho, tis_cap)`.
    SeqMaskTis,
}

/// The KL estimator against the reference policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `lp - ref`.
    K1,
    /// `exp(ref - lp) - (ref - lp) - 1` (unbiased, never negative).
    #[default]
    K3,
}

/// How per-token losses become one number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// `sum(loss * m) / sum(m)` over the batch: long answers weigh more (DAPO, Nemotron 3).
    #[default]
    TokenMean,
    /// The mean over sequences of each sequence's token mean (GRPO as published); a sequence
    /// without a masked token is left out of the mean.
    SeqMeanTokenMean,
    /// `sum(loss * m) / (B * norm_length)` (Dr. GRPO).
    SeqMeanTokenSumNorm,
}

macro_rules! names {
    ($ty:ty, $what:literal, [$($variant:ident = $name:literal),+ $(,)?]) => {
        impl $ty {
            /// Every accepted name, in documentation order.
            pub const NAMES: &'static [&'static str] = &[$($name),+];

            /// The name used in configs and on the wire.
            pub fn name(self) -> &'static str {
                match self { $(Self::$variant => $name),+ }
            }
        }

        impl FromStr for $ty {
            type Err = ObjectiveError;

            fn from_str(s: &str) -> Result<Self, ObjectiveError> {
                match s {
                    $($name => Ok(Self::$variant),)+
                    _ => Err(ObjectiveError::new($what, format!(
                        "unknown {} {s:?}; allowed: {}", $what, Self::NAMES.join(", ")
                    ))),
                }
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

names!(
    Algorithm,
    "algorithm",
    [
        Grpo = "grpo",
        Dapo = "dapo",
        DrGrpo = "dr_grpo",
        Gspo = "gspo",
        Cispo = "cispo",
        Reinforce = "reinforce",
    ]
);
names!(
    Correction,
    "correction",
    [
        None = "none",
        Tis = "tis",
        Icepop = "icepop",
        SeqMaskTis = "seq_mask_tis",
    ]
);
names!(KlEstimator, "kl_estimator", [K1 = "k1", K3 = "k3"]);
names!(
    Aggregation,
    "aggregation",
    [
        TokenMean = "token_mean",
        SeqMeanTokenMean = "seq_mean_token_mean",
        SeqMeanTokenSumNorm = "seq_mean_token_sum_norm",
    ]
);

/// A setting that is out of range or unknown; `setting` names it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{setting}: {message}")]
pub struct ObjectiveError {
    /// The setting's name (`eps_low`, `correction`, ...).
    pub setting: String,
    /// What was wrong and what is allowed.
    pub message: String,
}

impl ObjectiveError {
    fn new(setting: &str, message: impl Into<String>) -> Self {
        Self {
            setting: setting.to_string(),
            message: message.into(),
        }
    }
}

/// One RL objective, every setting resolved.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Objective {
    /// The estimator.
    pub algorithm: Algorithm,
    /// The ratio may fall to `1 - eps_low` before clipping (the sequence ratio for `gspo`).
    pub eps_low: f64,
    /// The ratio may rise to `1 + eps_high` before clipping.
    pub eps_high: f64,
    /// The off-policy correction.
    pub correction: Correction,
    /// Cap of `rho` for `tis` and `seq_mask_tis`.
    pub tis_cap: f64,
    /// Lower bound of `rho` kept by `icepop` and `seq_mask_tis`.
    pub icepop_low: f64,
    /// Upper bound of `rho` kept by `icepop` and `seq_mask_tis`.
    pub icepop_high: f64,
    /// How per-token losses are averaged.
    pub aggregation: Aggregation,
    /// The constant length of `seq_mean_token_sum_norm`; `None` means the batch's width `T`.
    pub norm_length: Option<u32>,
    /// Weight of the KL penalty to the reference policy (0 = off; > 0 needs reference
    /// log-probabilities, which the learner computes with the policy at the start of the
    /// group's stage).
    pub kl_coef: f64,
    /// The KL estimator.
    pub kl_estimator: KlEstimator,
}

impl Default for Objective {
    fn default() -> Self {
        Self::for_algorithm(Algorithm::default())
    }
}

impl Objective {
    /// Every setting [`Objective::set`] accepts.
    pub const SETTINGS: &'static [&'static str] = &[
        "algorithm",
        "eps_low",
        "eps_high",
        "correction",
        "tis_cap",
        "icepop_low",
        "icepop_high",
        "aggregation",
        "norm_length",
        "kl_coef",
        "kl_estimator",
    ];

    /// `algorithm` with its own defaults: clip range and aggregation as its authors published
    /// them, no correction (`tis_cap` 5, icepop bounds [0.5, 2]), no KL (k3 when turned on).
    pub fn for_algorithm(algorithm: Algorithm) -> Self {
        let (eps_low, eps_high, aggregation) = match algorithm {
            Algorithm::Grpo => (0.2, 0.2, Aggregation::SeqMeanTokenMean),
            Algorithm::Dapo => (0.2, 0.28, Aggregation::TokenMean),
            Algorithm::DrGrpo => (0.2, 0.2, Aggregation::SeqMeanTokenSumNorm),
            Algorithm::Gspo => (3e-4, 4e-4, Aggregation::SeqMeanTokenMean),
            // The importance weight is only bounded above (MiniMax-M1): a lower bound of 0.
            Algorithm::Cispo => (1.0, 4.0, Aggregation::TokenMean),
            // No ratio enters the estimator, so the clip range is unused.
            Algorithm::Reinforce => (0.2, 0.2, Aggregation::TokenMean),
        };
        Self {
            algorithm,
            eps_low,
            eps_high,
            correction: Correction::None,
            tis_cap: 5.0,
            icepop_low: 0.5,
            icepop_high: 2.0,
            aggregation,
            norm_length: None,
            kl_coef: 0.0,
            kl_estimator: KlEstimator::K3,
        }
    }

    /// Changes one setting by name from its text (`--option eps_high=0.3`). Changing
    /// `algorithm` keeps nothing else: put it first.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ObjectiveError> {
        let value = value.trim();
        let number = |key: &str| -> Result<f64, ObjectiveError> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    ObjectiveError::new(key, format!("{value:?} is not a finite number"))
                })
        };
        match key {
            "algorithm" => *self = Self::for_algorithm(value.parse()?),
            "eps_low" => self.eps_low = number(key)?,
            "eps_high" => self.eps_high = number(key)?,
            "correction" => self.correction = value.parse()?,
            "tis_cap" => self.tis_cap = number(key)?,
            "icepop_low" => self.icepop_low = number(key)?,
            "icepop_high" => self.icepop_high = number(key)?,
            "aggregation" => self.aggregation = value.parse()?,
            "norm_length" => {
                self.norm_length = Some(value.parse::<u32>().map_err(|_| {
                    ObjectiveError::new(key, format!("{value:?}; allowed: a whole number >= 1"))
                })?)
            }
            "kl_coef" => self.kl_coef = number(key)?,
            "kl_estimator" => self.kl_estimator = value.parse()?,
            other => {
                return Err(ObjectiveError::new(
                    other,
                    format!("unknown setting; allowed: {}", Self::SETTINGS.join(", ")),
                ));
            }
        }
        self.validate()
    }

    /// Checks every range; the error names the setting.
    pub fn validate(&self) -> Result<(), ObjectiveError> {
        let check = |ok: bool, key: &str, allowed: &str, value: f64| {
            if ok {
                Ok(())
            } else {
                Err(ObjectiveError::new(
                    key,
                    format!("{value}; allowed: {allowed}"),
                ))
            }
        };
        check(
            (0.0..=1.0).contains(&self.eps_low),
            "eps_low",
            "0 to 1",
            self.eps_low,
        )?;
        check(self.eps_high >= 0.0, "eps_high", ">= 0", self.eps_high)?;
        check(self.tis_cap > 0.0, "tis_cap", "> 0", self.tis_cap)?;
        check(
            self.icepop_low >= 0.0,
            "icepop_low",
            ">= 0",
            self.icepop_low,
        )?;
        check(
            self.icepop_high >= self.icepop_low,
            "icepop_high",
            ">= icepop_low",
            self.icepop_high,
        )?;
        check(self.kl_coef >= 0.0, "kl_coef", ">= 0", self.kl_coef)?;
        if self.norm_length == Some(0) {
            return Err(ObjectiveError::new("norm_length", "0; allowed: >= 1"));
        }
        Ok(())
    }

    /// The wire form, carried by every scored group.
    pub fn to_proto(&self) -> crate::v1::Objective {
        crate::v1::Objective {
            algorithm: self.algorithm.name().into(),
            eps_low: self.eps_low,
            eps_high: self.eps_high,
            correction: self.correction.name().into(),
            tis_cap: self.tis_cap,
            icepop_low: self.icepop_low,
            icepop_high: self.icepop_high,
            aggregation: self.aggregation.name().into(),
            norm_length: self.norm_length.unwrap_or(0),
            kl_coef: self.kl_coef,
            kl_estimator: self.kl_estimator.name().into(),
        }
    }

    /// Reads and validates the wire form.
    pub fn from_proto(p: &crate::v1::Objective) -> Result<Self, ObjectiveError> {
        let o = Self {
            algorithm: p.algorithm.parse()?,
            eps_low: p.eps_low,
            eps_high: p.eps_high,
            correction: p.correction.parse()?,
            tis_cap: p.tis_cap,
            icepop_low: p.icepop_low,
            icepop_high: p.icepop_high,
            aggregation: p.aggregation.parse()?,
            norm_length: (p.norm_length > 0).then_some(p.norm_length),
            kl_coef: p.kl_coef,
            kl_estimator: p.kl_estimator.parse()?,
        };
        o.validate()?;
        Ok(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_algorithm_has_its_published_defaults() {
        let grpo = Objective::for_algorithm(Algorithm::Grpo);
        assert_eq!(
            (grpo.eps_low, grpo.eps_high, grpo.aggregation),
            (0.2, 0.2, Aggregation::SeqMeanTokenMean)
        );
        let dapo = Objective::for_algorithm(Algorithm::Dapo);
        assert_eq!(
            (dapo.eps_low, dapo.eps_high, dapo.aggregation),
            (0.2, 0.28, Aggregation::TokenMean)
        );
        let dr = Objective::for_algorithm(Algorithm::DrGrpo);
        assert_eq!(dr.aggregation, Aggregation::SeqMeanTokenSumNorm);
        let gspo = Objective::for_algorithm(Algorithm::Gspo);
        assert_eq!((gspo.eps_low, gspo.eps_high), (3e-4, 4e-4));
        for a in Algorithm::NAMES {
            let o = Objective::for_algorithm(a.parse().expect("known"));
            o.validate().expect("defaults are valid");
            assert_eq!(o.correction, Correction::None);
            assert_eq!(o.kl_coef, 0.0);
        }
    }

    #[test]
    fn settings_are_changed_by_name_and_bad_ones_are_named() {
        let mut o = Objective::default();
        o.set("algorithm", "dapo").expect("known");
        o.set("correction", "icepop").expect("known");
        o.set("eps_high", "0.3").expect("number");
        o.set("norm_length", "128").expect("length");
        assert_eq!(o.algorithm, Algorithm::Dapo);
        assert_eq!(
            (o.correction, o.eps_high, o.norm_length),
            (Correction::Icepop, 0.3, Some(128))
        );

        let err = o.set("correction", "clip").expect_err("unknown");
        assert!(
            err.to_string().contains("none, tis, icepop, seq_mask_tis"),
            "{err}"
        );
        let err = o.set("eps", "0.1").expect_err("unknown key");
        assert!(
            err.to_string().contains("allowed: algorithm, eps_low"),
            "{err}"
        );
        let err = o.set("eps_low", "1.5").expect_err("range");
        assert_eq!(err.setting, "eps_low");
        let err = o.set("kl_coef", "nan").expect_err("not finite");
        assert_eq!(err.setting, "kl_coef");
        assert!(o.set("icepop_low", "3").is_err(), "low above high");
    }

    #[test]
    fn the_wire_form_round_trips() {
        let mut o = Objective::for_algorithm(Algorithm::Gspo);
        o.set("correction", "seq_mask_tis").expect("known");
        o.set("kl_coef", "0.05").expect("number");
        o.set("kl_estimator", "k1").expect("known");
        assert_eq!(Objective::from_proto(&o.to_proto()), Ok(o));
        let bad = crate::v1::Objective {
            algorithm: "ppo".into(),
            ..Objective::default().to_proto()
        };
        assert_eq!(
            Objective::from_proto(&bad).expect_err("unknown").setting,
            "algorithm"
        );
    }
}
