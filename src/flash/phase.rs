//! What a running flash is doing, derived from the BMC's status: a pure fold over the
//! `bytes_written` values it reports.
//!
//! bmcd reports `size` as the length of the upload (the compressed `.xz`), but `bytes_written`
//! counts the decompressed bytes written to the eMMC, and the count starts again from 0 for the
//! CRC read-back. So `bytes_written / size` is no percentage of anything (it passes 100 % while
//! writing); what is true is the phase and the byte counts.

use crate::config::size::human;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The image is still being sent; the BMC decompresses and writes it as it arrives.
    Uploading,
    /// Everything is sent; the BMC is still writing what it has buffered.
    Writing,
    /// The BMC reads the eMMC back for its CRC check (`bytes_written` started again).
    Verifying,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Uploading => "uploading",
            Phase::Writing => "writing",
            Phase::Verifying => "verifying",
        }
    }
}

/// The flash as far as the statuses seen so far tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    /// Bytes written to the eMMC (decompressed): the highest count of the write pass.
    pub written: u64,
    /// Bytes read back so far in the verify pass.
    pub verified: u64,
}

impl Progress {
    pub const START: Progress = Progress {
        phase: Phase::Uploading,
        written: 0,
        verified: 0,
    };

    /// Folds in one `Transferring` status of our transfer: its `bytes_written`, and whether
    /// our upload has finished sending.
    pub fn next(self, bytes_written: u64, uploaded: bool) -> Progress {
        if self.phase == Phase::Verifying || bytes_written < self.written {
            // The count went down: the write pass is over and the read-back has begun. (The
            // upload may still look unfinished to us: its answer can trail the last write.)
            return Progress {
                phase: Phase::Verifying,
                written: self.written,
                verified: bytes_written,
            };
        }
        Progress {
            phase: if uploaded {
                Phase::Writing
            } else {
                Phase::Uploading
            },
            written: bytes_written,
            verified: 0,
        }
    }

    /// One line for the user. `sent`/`upload_len`: bytes of the `.xz` sent so far and in all;
    /// `image_len`: the raw image's length, which is what the eMMC receives.
    pub fn describe(&self, sent: u64, upload_len: u64, image_len: u64) -> String {
        match self.phase {
            Phase::Uploading => format!(
                "uploading: {} of {} (.xz) sent, {} of {} written to the eMMC",
                human(sent),
                human(upload_len),
                human(self.written),
                human(image_len)
            ),
            Phase::Writing => format!(
                "writing: upload complete, {} of {} written to the eMMC",
                human(self.written),
                human(image_len)
            ),
            Phase::Verifying => format!(
                "verifying: {} of {} read back from the eMMC",
                human(self.verified),
                human(image_len)
            ),
        }
    }
}

/// The progress after each observation of `(bytes_written, uploaded)`, from the start.
pub fn trace(observations: &[(u64, bool)]) -> Vec<Progress> {
    observations
        .iter()
        .scan(Progress::START, |p, &(b, up)| {
            *p = p.next(b, up);
            Some(*p)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Phase::*;

    const MIB: u64 = 1 << 20;

    fn phases(obs: &[(u64, bool)]) -> Vec<Phase> {
        trace(obs).iter().map(|p| p.phase).collect()
    }

    /// A 900 MiB image that compresses to 100 MiB, reported as bmcd reports it: `size` is
    /// 100 MiB throughout, `bytes_written` goes to 900 MiB, then restarts for the CRC pass.
    #[test]
    fn an_xz_flash_goes_uploading_writing_verifying() {
        let obs = [
            (0, false),
            (150 * MIB, false),
            (600 * MIB, false),
            (880 * MIB, true),
            (900 * MIB, true),
            (40 * MIB, true),
            (700 * MIB, true),
            (900 * MIB, true),
        ];
        assert_eq!(
            phases(&obs),
            [
                Uploading, Uploading, Uploading, Writing, Writing, Verifying, Verifying, Verifying
            ]
        );
        let end = *trace(&obs).last().unwrap();
        assert_eq!(end.written, 900 * MIB, "written is the write pass's count");
        assert_eq!(end.verified, 900 * MIB);
    }

    #[test]
    fn the_restart_is_seen_even_before_the_upload_answer_arrives() {
        let obs = [(500 * MIB, false), (900 * MIB, false), (10 * MIB, false)];
        assert_eq!(phases(&obs), [Uploading, Uploading, Verifying]);
        // Once verifying, a growing count is read-back progress, not a second write.
        let p = trace(&obs)[2].next(950 * MIB, true);
        assert_eq!(
            (p.phase, p.written, p.verified),
            (Verifying, 900 * MIB, 950 * MIB)
        );
    }

    #[test]
    fn a_write_pass_that_did_not_move_is_not_a_restart() {
        assert_eq!(
            phases(&[(0, false), (0, false), (0, true), (5, true)]),
            [Uploading, Uploading, Writing, Writing]
        );
    }

    #[test]
    fn the_description_never_divides_by_the_compressed_size() {
        let p = trace(&[(900 * MIB, true)])[0];
        let d = p.describe(100 * MIB, 100 * MIB, 900 * MIB);
        assert!(d.starts_with("writing"), "{d}");
        assert!(!d.contains('%'), "{d}");
        assert!(d.contains(&human(900 * MIB)), "{d}");
        let v = trace(&[(900 * MIB, true), (3 * MIB, true)])[1];
        let d = v.describe(100 * MIB, 100 * MIB, 900 * MIB);
        assert!(
            d.starts_with("verifying") && d.contains(&human(3 * MIB)),
            "{d}"
        );
    }
}
