//! [`NetnsNames`]: the namespace names the output uses, by inode, and the
//! workloads behind them.

use std::collections::{BTreeMap, btree_map};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::Workload;

/// Known namespace names by inode, with the container/pod behind each
/// name where one was found. It reads like the `{inode: name}` map it
/// replaced (and serializes as exactly that map: the capture's NAMES
/// record); the workloads travel in their own WORKLOADS record.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NetnsNames {
    names: BTreeMap<u32, String>,
    workloads: BTreeMap<u32, Workload>,
}

impl NetnsNames {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn get(&self, inode: &u32) -> Option<&String> {
        self.names.get(inode)
    }
    pub fn insert(&mut self, inode: u32, name: String) -> Option<String> {
        self.names.insert(inode, name)
    }
    pub fn contains_key(&self, inode: &u32) -> bool {
        self.names.contains_key(inode)
    }
    pub fn len(&self) -> usize {
        self.names.len()
    }
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
    pub fn iter(&self) -> btree_map::Iter<'_, u32, String> {
        self.names.iter()
    }
    /// The container/pod owning namespace `inode`, if one was found.
    pub fn workload(&self, inode: u32) -> Option<&Workload> {
        self.workloads.get(&inode)
    }
    pub fn workloads(&self) -> &BTreeMap<u32, Workload> {
        &self.workloads
    }
    pub fn set_workload(&mut self, inode: u32, w: Workload) {
        self.workloads.insert(inode, w);
    }
    /// Replaces the workloads (a capture's WORKLOADS record).
    pub fn set_workloads(&mut self, w: BTreeMap<u32, Workload>) {
        self.workloads = w;
    }
}

impl FromIterator<(u32, String)> for NetnsNames {
    fn from_iter<I: IntoIterator<Item = (u32, String)>>(it: I) -> Self {
        NetnsNames {
            names: it.into_iter().collect(),
            workloads: BTreeMap::new(),
        }
    }
}

impl<'a> IntoIterator for &'a NetnsNames {
    type Item = (&'a u32, &'a String);
    type IntoIter = btree_map::Iter<'a, u32, String>;
    fn into_iter(self) -> Self::IntoIter {
        self.names.iter()
    }
}

impl Serialize for NetnsNames {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for NetnsNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(NetnsNames {
            names: BTreeMap::deserialize(d)?,
            workloads: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{Container, Runtime, Source};

    #[test]
    fn serializes_as_the_plain_names_map() {
        let mut n = NetnsNames::new();
        n.insert(7, "srv".into());
        n.set_workload(
            7,
            Workload {
                container: Some(Container {
                    runtime: Runtime::Docker,
                    id: "ab".into(),
                    name: Some("web".into()),
                    image: None,
                    namespace: None,
                    source: Source::Api,
                }),
                pod: None,
            },
        );
        let j = serde_json::to_string(&n).unwrap();
        assert_eq!(j, r#"{"7":"srv"}"#);
        let back: NetnsNames = serde_json::from_str(&j).unwrap();
        assert_eq!(back.get(&7).map(String::as_str), Some("srv"));
        assert!(back.workloads().is_empty());
    }
}
