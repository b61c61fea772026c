"""One vector per listing: pool its photos, mix with its text.

Written with Spark's higher-order array functions so fusion runs in the JVM (no Python round trip)
on any cluster size:
    image_embedding      = normalise(sum of the listing's ok photo vectors)   (= renormalised mean)
    multimodal_embedding = normalise(w * image + (1 - w) * text), or whichever of the two exists
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

INACTIVE_STATUSES = ("sold", "deleted")


def normalise(vector: Column) -> Column:
    # The norm is computed once, in aggregate's finish step: written inside transform's lambda it
    # would be re-evaluated for every element (quadratic in the dimension).
    return F.aggregate(
        vector,
        F.lit(0.0).cast("double"),
        lambda acc, x: acc + x.cast("double") * x,
        lambda sum_sq: F.when(sum_sq > 0, F.transform(vector, lambda x: (x / F.sqrt(sum_sq)).cast("float"))),
    )


def vector_sum(vectors: Column) -> Column:
    first = F.element_at(vectors, 1)
    return F.aggregate(
        F.slice(vectors, 2, F.greatest(F.size(vectors) - 1, F.lit(1))),
        first,
        lambda acc, v: F.zip_with(acc, v, lambda a, b: (a + b).cast("float")),
    )


def pooled_images(images: DataFrame) -> DataFrame:
    """ok photo rows -> (listing_id, image_embedding, n_images)."""
    return (
        images.where((F.col("status") == "ok") & F.col("embedding").isNotNull())
        .groupBy("listing_id")
        .agg(F.collect_list("embedding").alias("vectors"))
        .select(
            "listing_id",
            normalise(vector_sum(F.col("vectors"))).alias("image_embedding"),
            F.size("vectors").cast("int").alias("n_images"),
        )
    )


def fuse(listings: DataFrame, texts: DataFrame, images: DataFrame, image_weight: float) -> DataFrame:
    """listings (listing_id, status) + encoded texts + encoded photos -> one fused row per listing."""
    text_vectors = texts.select(
        "listing_id",
        F.when(F.col("status") == "ok", F.col("embedding")).alias("text_embedding"),
    )
    image, text = F.col("image_embedding"), F.col("text_embedding")
    mixed = normalise(
        F.zip_with(image, text, lambda a, b: (F.lit(image_weight) * a + F.lit(1.0 - image_weight) * b).cast("float"))
    )
    return (
        listings.select("listing_id", F.lower(F.col("status")).alias("listing_status"))
        .join(text_vectors, "listing_id", "left")
        .join(pooled_images(images), "listing_id", "left")
        .select(
            "listing_id",
            image,
            text,
            F.when(image.isNotNull() & text.isNotNull(), mixed)
            .otherwise(F.coalesce(image, text))
            .alias("multimodal_embedding"),
            F.coalesce(F.col("n_images"), F.lit(0)).cast("int").alias("n_images"),
            (~F.coalesce(F.col("listing_status").isin(*INACTIVE_STATUSES), F.lit(False))).alias("is_active"),
        )
    )
