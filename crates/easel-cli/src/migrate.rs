//! `easel migrate`: move a single-machine install (the SQLite store and the
//! asset folder of a data dir) to PostgreSQL and S3-compatible storage
//! (docs/DEPLOY.md). Records first (`Store::copy_into`), then the files the
//! records name. Idempotent and resumable: rows and files already in the
//! target are kept, so a copy that stopped is finished by running it again.
//! Stop the single-machine server first; its running jobs become queued ones
//! on the new store once their lease has expired.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use easel_server::assets::{AssetStore, AssetStoreSpec};
use easel_server::store::{redact_url, Store};

use crate::serve::ConfigArgs;

/// Arguments of `easel migrate`.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Where from: the data dir, `--database-url` and `asset_store` of
    /// this configuration [default: the SQLite store and folders of the
    /// default data dir].
    #[command(flatten)]
    pub config: ConfigArgs,
    /// The target job store (`postgres://USER:PASSWORD@HOST:PORT/DB`; the
    /// database must exist, its tables are created).
    #[arg(long, value_name = "URL")]
    pub to_database_url: String,
    /// The target asset store: `s3://BUCKET[/PREFIX]` (endpoint and
    /// credentials from the `AWS_*` variables and the config's `[s3]`) or a
    /// folder [default: leave the files where they are].
    #[arg(long, value_name = "DIR|s3://BUCKET/PREFIX")]
    pub to_asset_store: Option<String>,
}

/// `easel migrate`.
pub fn run(args: MigrateArgs) -> Result<ExitCode> {
    let config = args.config.load()?;
    let to_assets: Option<AssetStoreSpec> = args
        .to_asset_store
        .as_deref()
        .map(|s| s.parse())
        .transpose()
        .map_err(|e: String| anyhow::anyhow!("--to-asset-store: {e}"))?;
    if config.database_url.is_none() && !config.data_dir.join("easel.db").is_file() {
        bail!(
            "no job store to migrate: {} does not exist (give --data-dir or --database-url)",
            config.data_dir.join("easel.db").display()
        );
    }
    let from_url = config.database_url();
    if from_url == args.to_database_url {
        bail!("--to-database-url is the store being migrated");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        let source = Store::connect(&from_url)
            .await
            .with_context(|| format!("opening {}", redact_url(&from_url)))?;
        let target = Store::connect(&args.to_database_url)
            .await
            .with_context(|| format!("opening {}", redact_url(&args.to_database_url)))?;
        eprintln!(
            "easel migrate: records {} -> {}",
            redact_url(&from_url),
            redact_url(&args.to_database_url)
        );
        source
            .copy_into(&target, |t| {
                eprintln!(
                    "  {:<20} {:>8} rows, {:>8} copied now",
                    t.table, t.source_rows, t.inserted
                );
            })
            .await
            .context("copying the records (run the command again to resume)")?;
        if let Some(to) = to_assets {
            let from = config.asset_store_spec();
            for (name, files) in [
                ("assets", source.asset_files().await?),
                ("trainings", source.training_files().await?),
            ] {
                let src = AssetStore::open(&from, name, &config.data_dir, &config.s3)
                    .with_context(|| format!("opening the {name} store"))?;
                let dst = AssetStore::open(&to, name, &config.data_dir, &config.s3)
                    .with_context(|| format!("opening the target {name} store"))?;
                let (mut copied, mut present, mut missing) = (0usize, 0usize, 0usize);
                for (hash, extension) in &files {
                    if dst.exists(hash, extension).await? {
                        present += 1;
                        continue;
                    }
                    match src.get(hash, extension).await? {
                        Some(bytes) => {
                            let stored = dst.put(bytes, extension).await.with_context(|| {
                                format!("writing {hash}.{extension} to {}", dst.location())
                            })?;
                            if stored.hash != *hash {
                                bail!(
                                    "{hash}.{extension} in {} does not match its hash",
                                    src.location()
                                );
                            }
                            copied += 1;
                        }
                        None => {
                            eprintln!(
                                "  warning: {hash}.{extension} is recorded but not in {}",
                                src.location()
                            );
                            missing += 1;
                        }
                    }
                }
                eprintln!(
                    "  {name:<20} {:>8} files, {copied:>8} copied now, {present} already there, \
                     {missing} missing at the source ({} -> {})",
                    files.len(),
                    src.location(),
                    dst.location()
                );
            }
        }
        eprintln!(
            "easel migrate: done; point every node at the new store \
             (EASEL_DATABASE_URL{})",
            if args.to_asset_store.is_some() {
                ", EASEL_ASSET_STORE"
            } else {
                ""
            }
        );
        source.close().await;
        target.close().await;
        Ok(ExitCode::SUCCESS)
    })
}
