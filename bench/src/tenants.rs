//! Which tenant each call names: uniformly, or by a Zipf law over the
//! tenants' ranks (tenant 0 the most frequent), as YCSB's request
//! distribution. Sampling is rand_distr's.

use rand::{Rng, distributions::Uniform};
use rand_distr::{Distribution as _, Zipf};

use crate::Distribution;

#[derive(Clone, Debug)]
pub enum TenantPicker {
    /// A single tenant: nothing to draw.
    One,
    Uniform(Uniform<usize>),
    /// Draws a rank in 1..=T; tenant = rank - 1.
    Zipf {
        law: Zipf<f64>,
        tenants: usize,
    },
}

impl TenantPicker {
    pub fn new(tenants: u32, distribution: Distribution, exponent: f64) -> Result<Self, String> {
        let tenants = tenants as usize;
        if tenants == 0 {
            return Err("--tenants must be at least 1".into());
        }
        Ok(match distribution {
            _ if tenants == 1 => TenantPicker::One,
            Distribution::Uniform => TenantPicker::Uniform(Uniform::new(0, tenants)),
            Distribution::Zipf => {
                if !(exponent.is_finite() && exponent >= 0.0) {
                    return Err("--zipf-exponent must be a number >= 0".into());
                }
                let law = Zipf::new(tenants as u64, exponent)
                    .map_err(|e| format!("--zipf-exponent {exponent}: {e}"))?;
                TenantPicker::Zipf { law, tenants }
            }
        })
    }

    /// A tenant index in `0..T`.
    pub fn pick(&self, rng: &mut impl Rng) -> usize {
        match self {
            TenantPicker::One => 0,
            TenantPicker::Uniform(uniform) => rng.sample(uniform),
            TenantPicker::Zipf { law, tenants } => {
                // A rank in 1..=T as a float; the clamp only guards rounding.
                let rank = law.sample(rng) as usize;
                rank.clamp(1, *tenants) - 1
            }
        }
    }
}
