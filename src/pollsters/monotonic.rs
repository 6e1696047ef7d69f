//! Counters that never go backwards, whatever the kernel says.
//!
//! The kernel's counters are not always monotonic: a cpu's `iowait` time can decrease (the
//! kernel documents it as unreliable), a network driver that is reset starts its counts again
//! from 0, and an interface or a disk that goes away and comes back starts afresh. node_exporter
//! passes such values through and leaves `rate()` to cope with resets. Our promise is stronger —
//! totals never go backwards — and pushers send deltas (statsd) that a decrease would turn
//! negative. So the runtime passes every poll through [`Monotonic`]: for a counter series, a value
//! below the last one exposed keeps the last one (a small step back, as iowait takes), and a
//! value far below it — less than half, the sign of a reset — continues from the last total
//! (the new count is added to it), so nothing counted since the reset is lost.

use std::collections::HashMap;

use crate::layout::MetricType;
use crate::merge::{SnapFamily, Value};

/// Per counter series (family name and label text): the last raw value read and the total
/// exposed.
#[derive(Debug, Default)]
pub(crate) struct Monotonic {
    last: HashMap<(String, String), (f64, f64)>,
}

impl Monotonic {
    /// Makes every counter series in `fams` continue from what was exposed before. Series that
    /// are not in `fams` are forgotten (a pollster disabled, a device gone).
    pub(crate) fn apply(&mut self, fams: &mut [SnapFamily]) {
        let mut next = HashMap::with_capacity(self.last.len());
        for f in fams.iter_mut() {
            if f.meta.desc.metric_type != MetricType::Counter {
                continue;
            }
            for (labels, value) in f.series.iter_mut() {
                let Value::F64(raw) = *value else { continue };
                let key = (f.meta.desc.name.clone(), labels.text.clone());
                let total = match self.last.get(&key) {
                    None => raw,
                    Some(&(prev_raw, prev_total)) if raw >= prev_raw => prev_total + (raw - prev_raw),
                    // A reset: what was counted since starts again from 0.
                    Some(&(prev_raw, prev_total)) if raw < prev_raw / 2.0 => prev_total + raw,
                    // A step back: hold.
                    Some(&(_, prev_total)) => prev_total,
                };
                let total = if total.is_finite() { total } else { raw };
                *value = Value::F64(total);
                // After a step back the raw value is remembered, so the next increase counts from it.
                next.insert(key, (raw, total));
            }
        }
        self.last = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::ValueType;
    use crate::merge::FamilyMeta;
    use crate::merge::LabelSet;

    fn fams(t: MetricType, v: f64) -> Vec<SnapFamily> {
        let meta = FamilyMeta::own("node_x", "x", t, ValueType::F64, &["cpu"]);
        vec![SnapFamily { meta, series: vec![(LabelSet::shared(&[("cpu", "0")]), Value::F64(v))] }]
    }

    fn run(m: &mut Monotonic, t: MetricType, v: f64) -> f64 {
        let mut f = fams(t, v);
        m.apply(&mut f);
        match f[0].series[0].1 {
            Value::F64(x) => x,
            _ => f64::NAN,
        }
    }

    #[test]
    fn counters_hold_small_steps_back_and_continue_after_resets() {
        let mut m = Monotonic::default();
        let c = MetricType::Counter;
        assert_eq!(run(&mut m, c, 100.0), 100.0);
        assert_eq!(run(&mut m, c, 110.0), 110.0);
        // iowait going back a little: held.
        assert_eq!(run(&mut m, c, 108.0), 110.0);
        // and counting again from the new raw value.
        assert_eq!(run(&mut m, c, 111.0), 113.0);
        // a reset (a driver restarted its counts): continues from the total.
        assert_eq!(run(&mut m, c, 5.0), 118.0);
        assert_eq!(run(&mut m, c, 7.0), 120.0);
    }

    #[test]
    fn gauges_pass_through_and_gone_series_are_forgotten() {
        let mut m = Monotonic::default();
        assert_eq!(run(&mut m, MetricType::Gauge, 10.0), 10.0);
        assert_eq!(run(&mut m, MetricType::Gauge, 1.0), 1.0);
        assert_eq!(run(&mut m, MetricType::Counter, 50.0), 50.0);
        m.apply(&mut []);
        // The series went away: when it comes back, it is new.
        assert_eq!(run(&mut m, MetricType::Counter, 3.0), 3.0);
    }
}
