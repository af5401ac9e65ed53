"""The seven methods of Yao et al. (2024), "Machine Unlearning of Pre-trained LLMs"."""
from engine.methods import register
from engine.methods.base import Method
from engine.methods.forget_terms import AdversarialDescent, GradientAscent, RandomLabelDescent
from engine.methods.retain_terms import RetainDescent, RetainKL

register(Method("ga", "Gradient ascent on the forget set.", GradientAscent()))
register(Method("random_label", "Fine-tune the forget set towards uniformly random labels.", RandomLabelDescent()))
register(Method("adversarial", "Fine-tune the forget set towards the original model's best wrong guess.", AdversarialDescent()))
register(Method("ga_gd", "Gradient ascent on forget + descent on in-domain retain data (the study's most robust).",
                GradientAscent(), RetainDescent(), "retain"))
register(Method("ga_kl", "Gradient ascent on forget + KL to the original on in-domain retain data.",
                GradientAscent(), RetainKL(), "retain"))
register(Method("ga_gd_general", "Gradient ascent on forget + descent on general (out-of-domain) data.",
                GradientAscent(), RetainDescent(), "general"))
register(Method("ga_kl_general", "Gradient ascent on forget + KL to the original on general data.",
                GradientAscent(), RetainKL(), "general"))
