//! Choosing a backend: by type, by [`Kind`] value, or by `FORKLOOP_BACKEND`.

use std::fmt;
use std::str::FromStr;

use forkloop_backend::Backend;

use crate::{Error, Result};

/// The environment variable read by [`Loop::new`](crate::Loop::new): a comma list of
/// backend names; the first one that is compiled in and usable here wins.
pub const BACKEND_ENV: &str = "FORKLOOP_BACKEND";

/// The backends forkloop knows, whether or not they are compiled in.
///
/// ```
/// use forkloop::{Kind, Loop};
///
/// // Every backend compiled in and usable here, best first.
/// let usable: Vec<Kind> = Kind::ALL
///     .iter()
///     .copied()
///     .filter(|k| k.check_available().is_ok())
///     .collect();
/// assert_eq!(usable.first().copied(), Some(Kind::best()?));
/// // What FORKLOOP_BACKEND=nope,<best> would choose: the first usable of the list.
/// let best = Kind::best()?;
/// let lp: Loop = Loop::with_backend(Kind::first_usable(&format!("nope,{best}"))?)?;
/// assert_eq!(lp.backend_name(), best.name());
/// # Ok::<(), forkloop::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// epoll(7), Linux. Feature `epoll`.
    Epoll,
    /// kqueue(2), the BSDs and macOS. Feature `kqueue`.
    Kqueue,
    /// poll(2). Default feature `poll`.
    Poll,
    /// select(2); fds below FD_SETSIZE only. Default feature `select`.
    Select,
    /// The `mio` crate. Feature `mio`.
    Mio,
    /// The `polling` crate. Feature `polling`.
    Polling,
}

impl Kind {
    /// Every kind, best first: the order the default choice tries them in. A slice, so
    /// that a new backend is not a breaking change.
    pub const ALL: &'static [Kind] = &[
        Kind::Epoll,
        Kind::Kqueue,
        Kind::Poll,
        Kind::Select,
        Kind::Mio,
        Kind::Polling,
    ];

    /// The name used by `FORKLOOP_BACKEND`, `--backend` and the Cargo feature.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Epoll => "epoll",
            Kind::Kqueue => "kqueue",
            Kind::Poll => "poll",
            Kind::Select => "select",
            Kind::Mio => "mio",
            Kind::Polling => "polling",
        }
    }

    /// `Ok` if this backend is compiled in and can run on this OS; otherwise the error
    /// saying which of the two is missing.
    pub fn check_available(self) -> Result<()> {
        let compiled = match self {
            Kind::Epoll => cfg!(feature = "epoll"),
            Kind::Kqueue => cfg!(feature = "kqueue"),
            Kind::Poll => cfg!(feature = "poll"),
            Kind::Select => cfg!(feature = "select"),
            Kind::Mio => cfg!(feature = "mio"),
            Kind::Polling => cfg!(feature = "polling"),
        };
        if !compiled {
            return Err(Error::NotCompiledIn(self));
        }
        let reason = match self {
            Kind::Epoll if !cfg!(has_epoll) => "epoll exists only on Linux and Android",
            Kind::Kqueue if !cfg!(has_kqueue) => "kqueue exists only on macOS and the BSDs",
            _ => return Ok(()),
        };
        Err(Error::Unsupported { kind: self, reason })
    }

    /// The best backend compiled in and usable here: epoll > kqueue > poll > select >
    /// mio > polling.
    pub fn best() -> Result<Kind> {
        let names = Kind::ALL
            .iter()
            .map(|k| k.name())
            .collect::<Vec<_>>()
            .join(",");
        Kind::first_usable(&names)
    }

    /// Why each backend better than this one is not in use (not compiled in, or not
    /// available on this OS): what the default choice skipped.
    pub fn skipped_for(self) -> Vec<(Kind, Error)> {
        Kind::ALL
            .iter()
            .copied()
            .take_while(|&k| k != self)
            .filter_map(|k| k.check_available().err().map(|e| (k, e)))
            .collect()
    }

    /// The backend `FORKLOOP_BACKEND` asks for, or the best one if it is unset or empty.
    /// In a forked child the variable is taken as it was at the fork (the environment's
    /// lock is not safe there; see the fork contract), so a `set_var` in the child does
    /// not change it.
    pub fn from_env() -> Result<Kind> {
        let value = crate::fork::backend_env();
        match value.as_ref().and_then(|v| v.to_str()) {
            Some(value) if !value.trim().is_empty() => Kind::first_usable(value),
            _ => Kind::best(),
        }
    }

    /// The first backend of a comma list that is compiled in and usable here.
    pub fn first_usable(list: &str) -> Result<Kind> {
        let mut reasons = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            match name
                .parse::<Kind>()
                .and_then(|k| k.check_available().map(|()| k))
            {
                Ok(kind) => return Ok(kind),
                Err(e) => reasons.push(e.to_string()),
            }
        }
        Err(Error::NoUsableBackend {
            value: list.to_owned(),
            reasons: reasons.join("; "),
        })
    }

    /// Builds a backend of this kind (to wrap it, or to hand it to
    /// [`Loop::from_backend`](crate::Loop::from_backend)).
    pub fn create(self) -> Result<Box<dyn Backend>> {
        self.check_available()?;
        let created: std::io::Result<Box<dyn Backend>> = match self {
            #[cfg(has_epoll)]
            Kind::Epoll => forkloop_epoll::Epoll::new().map(|b| Box::new(b) as _),
            #[cfg(has_kqueue)]
            Kind::Kqueue => forkloop_kqueue::Kqueue::new().map(|b| Box::new(b) as _),
            #[cfg(feature = "poll")]
            Kind::Poll => Ok(Box::new(forkloop_poll::Poll::new())),
            #[cfg(feature = "select")]
            Kind::Select => Ok(Box::new(forkloop_select::Select::new())),
            #[cfg(feature = "mio")]
            Kind::Mio => forkloop_mio::Mio::new().map(|b| Box::new(b) as _),
            #[cfg(feature = "polling")]
            Kind::Polling => forkloop_polling::Polling::new().map(|b| Box::new(b) as _),
            #[allow(unreachable_patterns)]
            _ => unreachable!("check_available refused {self}"),
        };
        let what = match self {
            Kind::Epoll => "an epoll instance",
            Kind::Kqueue => "a kqueue",
            Kind::Mio => "a mio::Poll",
            Kind::Polling => "a polling::Poller",
            Kind::Poll | Kind::Select => "the backend",
        };
        created.map_err(|source| Error::Create { what, source })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Kind> {
        Kind::ALL
            .iter()
            .copied()
            .find(|k| k.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| Error::UnknownBackend(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for &kind in Kind::ALL {
            assert_eq!(kind.name().parse::<Kind>().unwrap(), kind);
        }
        assert!(matches!(
            "nope".parse::<Kind>(),
            Err(Error::UnknownBackend(_))
        ));
    }

    #[test]
    fn the_first_usable_backend_of_a_list_wins() {
        let best = Kind::best().unwrap();
        assert_eq!(Kind::first_usable(&format!("nope, {best}")).unwrap(), best);
        let err = Kind::first_usable("nope").unwrap_err().to_string();
        assert!(err.contains("unknown backend \"nope\""), "{err}");
    }

    #[test]
    fn the_default_choice_says_why_better_backends_were_skipped() {
        let best = Kind::best().unwrap();
        let skipped = best.skipped_for();
        assert_eq!(
            skipped.len(),
            Kind::ALL.iter().position(|&k| k == best).unwrap()
        );
        assert!(skipped
            .iter()
            .all(|(k, e)| e.to_string().contains(k.name())));
    }

    #[test]
    fn kqueue_is_refused_with_its_reason_off_bsd() {
        if cfg!(any(target_os = "linux", target_os = "android")) {
            let err = Kind::Kqueue.check_available().unwrap_err().to_string();
            assert!(err.contains("kqueue"), "{err}");
        }
    }
}
