//! One pipeline for every driver: the live trace, `report`/`export` reading
//! a capture, and (to come) the agent feed events through [`Pipeline::feed`]
//! — count, select, aggregate, detect amplification — so that a capture's
//! report is the live summary by construction, not by a second copy.

use crate::{
    analysis::aggregate::Aggregator,
    analysis::amplify::{AmpConfig, Detector},
    analysis::filter::Filter,
    kernel::workload::NetnsNames,
    model::{Analyses, KindCounts, clock::Clock, event::Event},
};

/// Which events the analyses see: the live filter, or offline the
/// recorded and command-line filters plus a time window.
pub trait Select {
    fn select(&self, e: &Event, names: &NetnsNames) -> bool;
}

impl Select for Filter {
    fn select(&self, e: &Event, _names: &NetnsNames) -> bool {
        self.matches(e)
    }
}

pub struct Pipeline<S> {
    pub select: S,
    /// Events per kind before selection (the summary's `events`).
    pub received: KindCounts,
    /// Sources, totals (`matched`) and rates of the selected events.
    pub agg: Aggregator,
    /// Retransmission amplification of the selected events.
    pub amp: Detector,
}

impl<S: Select> Pipeline<S> {
    pub fn new(select: S, max_sources: usize, amp: AmpConfig) -> Pipeline<S> {
        Pipeline {
            select,
            received: KindCounts::default(),
            agg: Aggregator::new(max_sources),
            amp: Detector::new(amp),
        }
    }

    /// Counts `e`; if it is selected, feeds every analysis. Returns whether
    /// it was selected.
    pub fn feed(&mut self, e: &Event, names: &NetnsNames) -> bool {
        *self.received.get_mut(e.kind) += 1;
        if !self.select.select(e, names) {
            return false;
        }
        // The detector's flow slot loads while the aggregator works.
        let p = self.amp.prepare(e);
        self.agg.record(e);
        self.amp.record_prepared(e, p);
        true
    }

    /// What the analyses concluded so far, for a summary.
    pub fn analyses(&self, clock: &Clock) -> Analyses {
        Analyses {
            error_bound: self.agg.error_bound(),
            untracked_sources: self.agg.untracked(),
            amplification: self.amp.summary(),
            findings: self.amp.findings(clock),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        analysis::filter::Filter,
        model::event::{Kind, Packet, Proto},
    };

    fn ev(kind: Kind, dport: u16) -> Event {
        Event {
            kind,
            ts_ns: 1,
            cpu: 0,
            netns: 1,
            proto: Proto::UDP,
            src: Some("10.0.0.7".parse().unwrap()),
            dst: Some("10.0.0.53".parse().unwrap()),
            sport: 40000,
            dport,
            reply: None,
            packet: Packet::EMPTY,
            sample: 1,
        }
    }

    #[test]
    fn counts_everything_analyses_the_selected() {
        let f = Filter {
            port: Some(53),
            ..Filter::default()
        };
        let mut p = Pipeline::new(f, 10, AmpConfig::default());
        let names = NetnsNames::new();
        assert!(p.feed(&ev(Kind::TableFull, 53), &names));
        assert!(!p.feed(&ev(Kind::TableFull, 80), &names));
        assert!(p.feed(&ev(Kind::InsertFailed, 53), &names));
        assert_eq!(p.received.table_full, 2);
        assert_eq!(p.agg.totals.table_full, 1);
        assert_eq!(p.agg.totals.insert_failed, 1);
        assert_eq!(p.amp.summary().drops, 2);
    }
}
