//! Confirmed, backpressured, reconnecting publishing of a run's batches.

use crate::connection::{connect_with_backoff, Backoff};
use crate::error::redact_url;
use crate::names::{eval_queue, train_queue, validate_run_id, RunLayout};
use crate::topology::{declare_run_topology, passive_count};
use crate::BrokerError;
use flowers_wire::{describe, encode_batch, Batch, BatchHeader, Split, DEFAULT_MAX_MESSAGE_BYTES};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::time::Duration;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How a [`Publisher`] paces itself.
#[derive(Debug, Clone)]
pub struct PublisherOptions {
    /// Upper bound on ready (unconsumed) batches across the run's queues.
    pub max_queued_batches: u32,
    /// Encoded batches larger than this are refused before publishing.
    pub max_message_bytes: usize,
    /// Batches published but not yet confirmed: enough keep the link busy
    /// while the broker persists the previous ones (16 x 8.6 MB doubled
    /// publishing speed over 4 on the development machine).
    pub max_unconfirmed: usize,
    /// Reconnection schedule when the broker is down.
    pub backoff: Backoff,
    /// How often to re-check queue depths while the queues are full.
    pub poll_interval: Duration,
    /// A confirm not received within this time counts as a broken connection.
    pub confirm_timeout: Duration,
    /// Messages written to disk by the broker (delivery mode 2), surviving its restart;
    /// transient ones (mode 1) are lost with a restart and must be replayed.
    pub persistent: bool,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            max_queued_batches: 64,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            max_unconfirmed: 16,
            backoff: Backoff::default(),
            poll_interval: Duration::from_millis(100),
            confirm_timeout: Duration::from_secs(60),
            persistent: true,
        }
    }
}

/// Identifies a batch within a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BatchKey {
    pub epoch: u32,
    /// `true` for validation batches.
    pub validation: bool,
    /// Which evaluation of the epoch a validation batch is for (0: its end).
    pub eval_part: u32,
    pub batch_index: u32,
}

impl BatchKey {
    /// The key a planned batch (its header) is published and counted under.
    pub fn of_header(header: &BatchHeader) -> Self {
        let validation = header.split == Split::Validation;
        BatchKey {
            epoch: header.epoch,
            validation,
            eval_part: if validation { header.eval_part } else { 0 },
            batch_index: header.batch_index,
        }
    }

    fn of(batch: &Batch) -> Self {
        let validation = batch.split == Split::Validation as i32;
        BatchKey {
            epoch: batch.epoch,
            validation,
            eval_part: if validation { batch.eval_part } else { 0 },
            batch_index: batch.batch_index,
        }
    }

    fn queue(&self, run_id: &str) -> String {
        if self.validation {
            eval_queue(run_id, self.epoch, self.eval_part)
        } else {
            train_queue(run_id, self.epoch)
        }
    }
}

/// What [`Publisher::publish`] did with a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Sent; it counts once [`Publisher::flush`] (or later publishing) has
    /// seen the broker's confirm.
    Sent,
    /// Already confirmed (or already on its way) earlier: not sent again.
    Duplicate,
}

/// Totals of confirmed batches.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishStats {
    /// Confirmed batches.
    pub batches: u64,
    /// Confirmed message payload bytes.
    pub payload_bytes: u64,
    /// Times the connection was re-established.
    pub reconnects: u32,
    /// Times publishing waited for consumers because the queues were full.
    pub backpressure_waits: u64,
}

struct Pending {
    key: BatchKey,
    queue: String,
    what: String,
    payload: Vec<u8>,
    /// `None` until sent on the current connection.
    confirm: Option<PublisherConfirm>,
}

struct Link {
    // Held so the connection stays open as long as the channel is in use.
    conn: Connection,
    channel: Channel,
}

/// Publishes one run's batches with publisher confirms (persistent or transient
/// delivery, [`PublisherOptions::persistent`]), keeping at most `max_queued_batches` ready in the run's queues,
/// and reconnecting with backoff when the broker goes away. Batches not yet
/// confirmed when a connection breaks are sent again in order on the next
/// one; confirmed ones never are.
pub struct Publisher {
    url: String,
    run_id: String,
    layout: RunLayout,
    opts: PublisherOptions,
    link: Option<Link>,
    pending: VecDeque<Pending>,
    /// Confirmed batch indices by (epoch, validation, eval_part).
    confirmed: BTreeMap<(u32, bool, u32), BTreeSet<u32>>,
    /// Confirmed since the last [`Publisher::take_confirmed`].
    newly_confirmed: Vec<BatchKey>,
    /// The epoch the run's consumers are at: queues of earlier epochs, which nobody consumes
    /// any more, do not hold publishing back.
    first_live_epoch: Option<watch::Receiver<u32>>,
    /// Upper bound on ready messages in the run's queues: the last polled
    /// depth plus everything sent since.
    queued_bound: u64,
    /// Queues that may hold ready messages (polled when the bound is reached), with their
    /// epochs.
    maybe_nonempty: BTreeSet<(u32, String)>,
    stats: PublishStats,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("url", &redact_url(&self.url))
            .field("run_id", &self.run_id)
            .field("pending", &self.pending.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl Publisher {
    /// Connects (retrying per `opts.backoff`) and declares the run's queues
    /// (`layout`), so consumers can subscribe before batches flow.
    pub async fn connect(
        url: &str,
        run_id: &str,
        layout: RunLayout,
        opts: PublisherOptions,
    ) -> Result<Self, BrokerError> {
        validate_run_id(run_id)?;
        let mut publisher = Publisher {
            url: url.to_string(),
            run_id: run_id.to_string(),
            layout,
            opts,
            link: None,
            pending: VecDeque::new(),
            confirmed: BTreeMap::new(),
            newly_confirmed: Vec::new(),
            first_live_epoch: None,
            queued_bound: 0,
            maybe_nonempty: BTreeSet::new(),
            stats: PublishStats::default(),
        };
        publisher.drive(usize::MAX).await?;
        Ok(publisher)
    }

    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    pub fn stats(&self) -> &PublishStats {
        &self.stats
    }

    /// Confirmed batch indices of one epoch's train (`validation == false`)
    /// or epoch-end validation batches.
    pub fn confirmed(&self, epoch: u32, validation: bool) -> Option<&BTreeSet<u32>> {
        self.confirmed.get(&(epoch, validation, 0))
    }

    /// Confirmed validation batches of one epoch's interim evaluations, all parts together.
    pub fn confirmed_interim(&self, epoch: u32) -> usize {
        self.confirmed
            .range((epoch, true, 1)..=(epoch, true, u32::MAX))
            .map(|(_, set)| set.len())
            .sum()
    }

    pub fn is_confirmed(&self, key: BatchKey) -> bool {
        self.confirmed
            .get(&(key.epoch, key.validation, key.eval_part))
            .is_some_and(|set| set.contains(&key.batch_index))
    }

    /// The batches confirmed since the last call, in confirm order (e.g. for a log of what
    /// reached the broker).
    pub fn take_confirmed(&mut self) -> Vec<BatchKey> {
        std::mem::take(&mut self.newly_confirmed)
    }

    /// From now on, queues of epochs before the one `epoch` holds do not count towards
    /// `max_queued_batches`: their consumers have left them.
    pub fn follow_epochs(&mut self, epoch: watch::Receiver<u32>) {
        self.first_live_epoch = Some(epoch);
    }

    /// Verifies, encodes (refusing it if over the size limit) and sends
    /// `batch` to its queue once there is room. Returns after sending; up to
    /// `max_unconfirmed` batches may await their confirms.
    pub async fn publish(&mut self, batch: &Batch) -> Result<Published, BrokerError> {
        let key = BatchKey::of(batch);
        if self.is_confirmed(key) || self.pending.iter().any(|p| p.key == key) {
            debug!(batch = %describe(batch), "already published; skipping");
            return Ok(Published::Duplicate);
        }
        self.send(batch).await
    }

    /// Like [`Publisher::publish`], but sends `batch` even if it was confirmed before: for a
    /// batch the broker lost (see the loader's replay).
    pub async fn republish(&mut self, batch: &Batch) -> Result<Published, BrokerError> {
        self.send(batch).await
    }

    async fn send(&mut self, batch: &Batch) -> Result<Published, BrokerError> {
        if batch.run_id != self.run_id {
            return Err(BrokerError::WrongRun {
                batch_run: batch.run_id.clone(),
                run: self.run_id.clone(),
            });
        }
        let payload = encode_batch(batch, self.opts.max_message_bytes)?;
        let key = BatchKey::of(batch);
        self.pending.push_back(Pending {
            key,
            queue: key.queue(&self.run_id),
            what: describe(batch),
            payload,
            confirm: None,
        });
        self.drive(self.opts.max_unconfirmed.saturating_sub(1))
            .await?;
        Ok(Published::Sent)
    }

    /// Waits until every sent batch is confirmed.
    pub async fn flush(&mut self) -> Result<(), BrokerError> {
        self.drive(0).await
    }

    /// Flushes and closes the connection.
    pub async fn close(mut self) -> Result<PublishStats, BrokerError> {
        self.flush().await?;
        if let Some(link) = self.link.take() {
            // The batches are confirmed; a failing close loses nothing.
            let _ = link.conn.close(200, "OK".into()).await;
        }
        Ok(self.stats)
    }

    /// Sends everything pending and settles confirms until at most `keep`
    /// batches await theirs, reconnecting on transient failures.
    async fn drive(&mut self, keep: usize) -> Result<(), BrokerError> {
        loop {
            match self.try_drive(keep).await {
                Ok(()) => return Ok(()),
                Err(err) if err.is_transient() => {
                    let resend = self.pending.len();
                    warn!(error = %err, unconfirmed = resend, "lost the RabbitMQ connection; reconnecting, then re-sending the unconfirmed batches");
                    self.link = None;
                    for pending in &mut self.pending {
                        pending.confirm = None;
                    }
                    self.stats.reconnects += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    async fn try_drive(&mut self, keep: usize) -> Result<(), BrokerError> {
        let channel = self.ensure_link().await?;
        while self.pending.iter().any(|p| p.confirm.is_none()) {
            // Making room settles confirms, which shifts the queue: look up afterwards.
            self.make_room(&channel).await?;
            let Some(pending) = self.pending.iter_mut().find(|p| p.confirm.is_none()) else {
                break;
            };
            let confirm = channel
                .basic_publish(
                    "".into(),
                    pending.queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &pending.payload,
                    BasicProperties::default()
                        .with_delivery_mode(if self.opts.persistent { 2 } else { 1 })
                        .with_content_type("application/x-protobuf".into())
                        .with_type("flowers.v1.Batch".into()),
                )
                .await
                .map_err(|e| BrokerError::amqp("publish to", &pending.queue, e))?;
            pending.confirm = Some(confirm);
            self.queued_bound += 1;
            self.maybe_nonempty
                .insert((pending.key.epoch, pending.queue.clone()));
        }
        while self.pending.len() > keep {
            self.settle_front().await?;
        }
        Ok(())
    }

    async fn ensure_link(&mut self) -> Result<Channel, BrokerError> {
        if let Some(link) = &self.link {
            if link.conn.status().connected() && link.channel.status().connected() {
                return Ok(link.channel.clone());
            }
        }
        let name = format!("flowers-loader {}", self.run_id);
        let conn = connect_with_backoff(&self.url, &name, &self.opts.backoff).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| BrokerError::amqp("open channel on", redact_url(&self.url), e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| {
                BrokerError::amqp("enable publisher confirms on", redact_url(&self.url), e)
            })?;
        declare_run_topology(&channel, &self.run_id, self.layout).await?;
        if self.stats.reconnects > 0 {
            info!(url = %redact_url(&self.url), reconnects = self.stats.reconnects, "reconnected to RabbitMQ");
        }
        // Depths are unknown after a reconnect: poll before the next send.
        self.queued_bound = u64::from(self.opts.max_queued_batches);
        for epoch in 0..self.layout.epochs {
            self.maybe_nonempty.extend(
                self.layout
                    .epoch_queues(&self.run_id, epoch)
                    .into_iter()
                    .map(|q| (epoch, q)),
            );
        }
        self.link = Some(Link {
            conn,
            channel: channel.clone(),
        });
        Ok(channel)
    }

    /// Returns once one more batch keeps the run within `max_queued_batches`.
    async fn make_room(&mut self, channel: &Channel) -> Result<(), BrokerError> {
        let max = u64::from(self.opts.max_queued_batches.max(1));
        let mut waiting = false;
        while self.queued_bound >= max {
            // Confirmed messages are enqueued, so the poll below counts them.
            while self.pending.front().is_some_and(|p| p.confirm.is_some()) {
                self.settle_front().await?;
            }
            let mut total = 0u64;
            let live = self
                .first_live_epoch
                .as_ref()
                .map_or(0, |epoch| *epoch.borrow());
            // Left behind by the consumers: whatever those queues hold waits for nobody.
            self.maybe_nonempty.retain(|(epoch, _)| *epoch >= live);
            let queues: Vec<(u32, String)> = self.maybe_nonempty.iter().cloned().collect();
            for (epoch, queue) in queues {
                let count = passive_count(channel, &queue).await?;
                if count == 0 {
                    self.maybe_nonempty.remove(&(epoch, queue));
                }
                total += u64::from(count);
            }
            self.queued_bound = total;
            if total >= max {
                if !waiting {
                    info!(queued = total, max, "queues full; waiting for consumers");
                    self.stats.backpressure_waits += 1;
                    waiting = true;
                }
                tokio::time::sleep(self.opts.poll_interval).await;
            }
        }
        if waiting {
            info!(
                queued = self.queued_bound,
                "queues have room again; publishing"
            );
        }
        Ok(())
    }

    /// Awaits the oldest sent batch's confirm and records it.
    async fn settle_front(&mut self) -> Result<(), BrokerError> {
        let Some(front) = self.pending.front_mut() else {
            return Ok(());
        };
        let Some(confirm) = front.confirm.take() else {
            return Ok(());
        };
        let what = front.what.clone();
        let confirmation = match tokio::time::timeout(self.opts.confirm_timeout, confirm).await {
            Err(_) => {
                return Err(BrokerError::ConfirmTimeout {
                    what,
                    timeout: self.opts.confirm_timeout,
                })
            }
            Ok(result) => result.map_err(|e| BrokerError::amqp("await confirm of", &what, e))?,
        };
        let front = self.pending.pop_front().expect("front exists");
        match confirmation {
            Confirmation::Ack(None) => {
                self.confirmed
                    .entry((front.key.epoch, front.key.validation, front.key.eval_part))
                    .or_default()
                    .insert(front.key.batch_index);
                self.newly_confirmed.push(front.key);
                self.stats.batches += 1;
                self.stats.payload_bytes += front.payload.len() as u64;
                Ok(())
            }
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(BrokerError::Returned {
                    what,
                    queue: front.queue,
                    reply: format!("{} {}", returned.reply_code, returned.reply_text),
                })
            }
            Confirmation::Nack(None) => Err(BrokerError::Nacked {
                what,
                queue: front.queue,
            }),
            Confirmation::NotRequested => unreachable!("confirm_select is on for every link"),
        }
    }
}
